"""Start ``jaxseq-server`` processes, and other ``jaxseq`` commands that serve, from Python (the demo and the
tests use it).

Each process runs in its own process group, so that ``kill`` ends it and everything it started (a server's
DHT process and p2pd) by PID, as a machine dying would.
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
from typing import IO, TypeVar

READY = "jaxseq server ready: "

Launched = TypeVar("Launched", bound="LaunchedProcess")


class LaunchedProcess:
    """A process started in its own group, ready once it prints a line starting with ``ready``; ``announced``
    is the rest of that line. Its stderr goes to a log file (``log_tail``). Used as a context manager, it
    SIGKILLs the process (and what it started) on leaving, whatever happened.

    Example:
        >>> code = "import time; print('up at here', flush=True); time.sleep(60)"
        >>> with LaunchedProcess([sys.executable, "-c", code], ready="up at ").wait_ready() as process:
        ...     process.announced
        'here'
        >>> process.process.returncode  # SIGKILLed on leaving the block
        -9
    """

    def __init__(self, args: Sequence[str], ready: str, env: Mapping[str, str] | None = None, name: str | None = None):
        self.ready, self.name = ready, name or os.path.basename(args[0])
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{self.name}-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
        if self.process.stdout is None:
            raise RuntimeError("the process's stdout is not a pipe")  # Popen(stdout=PIPE) always makes one
        self._stdout: IO[str] = self.process.stdout
        self._announced: str | None = None

    @property
    def announced(self) -> str:
        """The rest of the ready line."""
        if self._announced is None:
            raise RuntimeError(f"{self.name} is not ready yet: call wait_ready() first")
        return self._announced

    def __enter__(self: Launched) -> Launched:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.returncode is None:
            self.kill()

    def wait_ready(self: Launched, timeout: float = 120.0) -> Launched:
        """Wait for the ready line; on failure kill the process and raise with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._stdout], [], [], 0.5)
            if ready:
                line = self._stdout.readline()
                if line.startswith(self.ready):
                    self._announced = line[len(self.ready) :].strip()
                    return self
            if self.process.poll() is not None:
                break
        tail = self.log_tail()
        self.kill()
        raise RuntimeError(f"{self.name} did not become ready; log tail:\n{tail}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-chars:]

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its process group), as a machine dying would."""
        self._end_group()
        self._release()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM the process alone and wait for its exit code; SIGKILL its group if it has not exited within
        ``timeout``, and what it left behind in its group once it has (a forked DHT process outlives a process
        that dies of the signal)."""
        try:
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode
        self._end_group()
        self._release()
        return code

    def _end_group(self, timeout: float = 10.0) -> None:
        """SIGKILL the process group, reap the process, and wait (up to ``timeout``) until the group's other
        members are reaped too: a killed child whose parent is gone stays a member until init reaps it."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(self.process.pid, 0)  # ProcessLookupError once no member is left
                time.sleep(0.01)

    def _release(self) -> None:
        """The process is gone: close its pipe and remove its log (read ``log_tail`` before, if needed)."""
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


class ServerProcess(LaunchedProcess):
    """One ``jaxseq-server`` process; ``maddr`` is the multiaddr it printed when ready. ``env`` adds to
    (or overrides) this process's environment for it. ``terminate`` makes it announce OFFLINE and exit.

    Example:
        >>> with ServerProcess(checkpoint, (0, 4), "doc-llama").wait_ready() as server:
        ...     server.maddr.startswith("/ip4/127.0.0.1/tcp/")
        True
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
        super().__init__(args, READY, env, name="jaxseq-server")

    @property
    def maddr(self) -> str:
        """The multiaddr the server printed when ready."""
        return self.announced

    @property
    def peer_id(self) -> str:
        """The server's peer id (base58)."""
        return self.maddr.rsplit("/p2p/", 1)[1]
