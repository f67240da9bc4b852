"""Start ``jaxseq-server`` processes from Python (the demo and the tests use it).

Each server runs in its own process group, so that ``kill`` ends it and everything it started
(its DHT process and p2pd) by PID, as a machine dying would.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO

READY = "jaxseq server ready: "


class ServerProcess:
    """One ``jaxseq-server`` process; ``maddr`` is the multiaddr it printed when ready. ``env`` adds to
    (or overrides) this process's environment for it.

    Used as a context manager, it SIGKILLs the server (and what it started) on leaving, whatever happened.

    Example:
        >>> with ServerProcess(checkpoint, (0, 4), "doc-llama").wait_ready() as server:
        ...     server.maddr.startswith("/ip4/127.0.0.1/tcp/")
        True
        >>> server.process.returncode  # SIGKILLed on leaving the block
        -9
    """

    def __init__(
        self,
        checkpoint: str,
        blocks: tuple[int, int],
        dht_prefix: str,
        initial_peers: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        command: Sequence[str] = (sys.executable, "-m", "jaxseq.server.main"),
        env: Mapping[str, str] | None = None,
    ):
        args = [
            *command,
            "--checkpoint",
            str(checkpoint),
            "--blocks",
            f"{blocks[0]}:{blocks[1]}",
            "--dht-prefix",
            dht_prefix,
            *extra_args,
        ]
        args += ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
        self.blocks = blocks
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jaxseq-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
        if self.process.stdout is None:
            raise RuntimeError("the server's stdout is not a pipe")  # Popen(stdout=PIPE) always makes one
        self._stdout: IO[str] = self.process.stdout
        self._maddr: str | None = None

    @property
    def maddr(self) -> str:
        """The multiaddr the server printed when ready."""
        if self._maddr is None:
            raise RuntimeError("the server is not ready yet: call wait_ready() first")
        return self._maddr

    @property
    def peer_id(self) -> str:
        """The server's peer id (base58)."""
        return self.maddr.rsplit("/p2p/", 1)[1]

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.returncode is None:
            self.kill()

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        """Wait for the ready line; on failure kill the server and raise with its log."""
        self._maddr = self._read_ready_line(timeout)
        return self

    def _read_ready_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._stdout], [], [], 0.5)
            if ready:
                line = self._stdout.readline()
                if line.startswith(READY):
                    return line[len(READY) :].strip()
            if self.process.poll() is not None:
                break
        tail = self.log_tail()
        self.kill()
        raise RuntimeError(f"jaxseq-server did not become ready; log tail:\n{tail}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-chars:]

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its process group), as a machine dying would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._release()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM the server alone (it announces OFFLINE and exits) and wait for its exit code;
        SIGKILL its group if it has not exited within ``timeout``."""
        try:
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode
        self._release()
        return code

    def _release(self) -> None:
        """The server is gone: close its pipe and remove its log (read ``log_tail`` before, if needed)."""
        self._stdout.close()
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log.name)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False
