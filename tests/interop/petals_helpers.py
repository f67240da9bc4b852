"""Run a real Petals 2.2 (server and client) from its own venv, for interop tests.

These helpers run under jaxseq's own environment; everything Petals-specific happens in
subprocesses of the venv built by ``tests/interop/petals_venv.sh`` (Petals 2.2 pins
transformers<4.35 and an old hivemind, which clash with jaxseq's dependencies).

Typical use in a test::

    python, reason = find_petals_python()
    if python is None:
        pytest.skip(reason)
    ckpt = write_tiny_checkpoint_with_petals_venv(python, tmp_path / "ckpt")
    with petals_server(python, ckpt, block_indices="0:4", dht_prefix="tiny") as server:
        result = petals_client_fwd_bwd(python, ckpt, [server.maddr], dht_prefix="tiny")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_SCRIPT = HERE / "petals_venv.sh"

#: petals_venv.sh exits with this code when the package index cannot be reached.
EXIT_UNAVAILABLE = 3
UNAVAILABLE_PREFIX = "PETALS-VENV-UNAVAILABLE:"

# "Running a server on ['/ip4/127.0.0.1/tcp/PORT/p2p/PEERID']" (petals.server.server.Server.__init__)
_MADDR_RE = re.compile(r"Running a server on \[.*?'(/ip4/127\.0\.0\.1/tcp/(\d+)/p2p/([1-9A-HJ-NP-Za-km-z]+))'")
# hivemind's Runtime logs "Started" once its pools run; ModuleContainer starts it only after every
# connection handler registered its p2p handlers, so the server answers RPCs from then on.
_READY_RE = re.compile(r"\[INFO\] Started\s*$", re.MULTILINE)


class PetalsVenvUnavailable(RuntimeError):
    """The Petals venv could not be built because the package index was unreachable."""


class PetalsError(RuntimeError):
    """A Petals subprocess (venv build, checkpoint writer, server, client) failed."""


def _clean_env(extra: dict | None = None) -> dict:
    """Environment for the Petals venv's python: none of jaxseq's venv leaks into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    # Petals' client retries forever by default; a test should fail instead of hanging.
    env.setdefault("PETALS_MAX_RETRIES", "3")
    if extra:
        env.update(extra)
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@functools.cache
def find_petals_python(timeout: float = 1800.0) -> tuple[str | None, str]:
    """Build or reuse the Petals venv. Returns ``(python, "")`` or ``(None, reason)`` when unavailable.

    ``JAXSEQ_PETALS_PYTHON`` short-circuits the build with an existing interpreter.
    Raises :class:`PetalsError` when the build fails for any other reason than the network.
    """
    preset = os.environ.get("JAXSEQ_PETALS_PYTHON")
    if preset:
        return preset, ""
    proc = subprocess.run(
        ["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode == EXIT_UNAVAILABLE:
        reasons = [line for line in proc.stderr.splitlines() if line.startswith(UNAVAILABLE_PREFIX)]
        return None, reasons[-1] if reasons else f"{UNAVAILABLE_PREFIX} {_tail(proc.stderr, 5)}"
    if proc.returncode != 0:
        raise PetalsError(f"{VENV_SCRIPT} exited with {proc.returncode}:\n{_tail(proc.stderr)}")
    lines = proc.stdout.strip().splitlines()
    if not lines or not Path(lines[-1]).is_file():
        raise PetalsError(f"{VENV_SCRIPT} printed no interpreter path; stdout: {proc.stdout!r}")
    return lines[-1], ""


def petals_python() -> str:
    """The Petals venv's python; raises :class:`PetalsVenvUnavailable` (with the reason) without network."""
    python, reason = find_petals_python()
    if python is None:
        raise PetalsVenvUnavailable(reason)
    return python


def run_in_petals_venv(python: str, code: str, *args: str, timeout: float = 120.0) -> str:
    """Run ``python -c code *args`` in the Petals venv; return its stdout, raise PetalsError with the output.

    The subprocess gets its own process group, killed afterwards, so that a p2pd daemon started
    by a Petals client in it never outlives it (also on timeout).
    """
    process = subprocess.Popen(
        [python, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_process_group(process, graceful_timeout=0, kill_timeout=5.0)
        stdout, stderr = process.communicate()
        raise PetalsError(
            f"Petals venv subprocess timed out after {timeout:.0f} s\n--- stdout ---\n{_tail(stdout)}"
            f"\n--- stderr ---\n{_tail(stderr)}"
        ) from None
    finally:
        _stop_process_group(process, graceful_timeout=0, kill_timeout=5.0)  # leftovers of its group, if any
    if process.returncode != 0:
        raise PetalsError(
            f"Petals venv subprocess exited with {process.returncode}\n--- stdout ---\n{_tail(stdout)}"
            f"\n--- stderr ---\n{_tail(stderr)}"
        )
    return stdout


_WRITE_CHECKPOINT = r"""
import json, sys
import torch, transformers
spec = json.loads(sys.argv[1])
torch.manual_seed(spec.pop("seed"))
config = transformers.LlamaConfig(torch_dtype="float32", **spec)
model = transformers.LlamaForCausalLM(config).float().eval()
model.save_pretrained(sys.argv[2], safe_serialization=True)
print(json.dumps({"transformers": transformers.__version__}))
"""


def write_tiny_checkpoint_with_petals_venv(
    python: str,
    path: os.PathLike | str,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 128,
    vocab: int = 100,
    seed: int = 0,
    init_std: float = 0.02,
    rms_norm_eps: float = 1e-6,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a random float32 ``LlamaForCausalLM`` checkpoint (safetensors) with the venv's transformers 4.34.

    ``init_std`` is Llama's ``initializer_range``; raise it (e.g. 0.2) so that the blocks change
    their inputs substantially and a wrong block shows up in comparisons.
    """
    path = Path(path)
    spec = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate, vocab_size=vocab, initializer_range=init_std, rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta, max_position_embeddings=max_position_embeddings, seed=seed,
    )  # fmt: skip
    run_in_petals_venv(python, _WRITE_CHECKPOINT, json.dumps(spec), str(path))
    if not (path / "model.safetensors").is_file():
        raise PetalsError(f"no model.safetensors written in {path}")
    return path


@dataclasses.dataclass
class PetalsServer:
    """A running ``petals.cli.run_server`` process (see :func:`petals_server`)."""

    maddr: str  # /ip4/127.0.0.1/tcp/PORT/p2p/PEERID
    peer_id: str  # base58
    port: int
    process: subprocess.Popen
    log_path: Path
    startup_s: float

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path.read_text(errors="replace"), lines)


def _stop_process_group(process: subprocess.Popen, *, graceful_timeout: float, kill_timeout: float) -> None:
    """Stop a server started with start_new_session=True: its PID is its process group id.

    SIGINT to the leader first (Petals catches KeyboardInterrupt, announces its blocks offline and
    shuts its DHT/p2pd down), then SIGTERM and SIGKILL to the whole group, which holds the p2pd
    daemons and forked handler/pool processes. Only this group is ever signalled.
    """
    pgid = process.pid

    def signal_group(sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:  # the whole group is gone
            return False

    def group_alive() -> bool:
        return signal_group(0)

    def wait_group(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process.poll()  # reap the leader so that it does not linger as a zombie
            if not group_alive():
                return True
            time.sleep(0.1)
        process.poll()
        return not group_alive()

    if process.poll() is None and graceful_timeout > 0:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        if wait_group(graceful_timeout):
            return
    if signal_group(signal.SIGTERM) and wait_group(kill_timeout):
        return
    signal_group(signal.SIGKILL)
    wait_group(kill_timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=kill_timeout)


@contextlib.contextmanager
def petals_server(
    python: str,
    checkpoint: os.PathLike | str,
    *,
    block_indices: str = "0:4",
    dht_prefix: str = "jaxseq-petals-test",
    initial_peers: Sequence[str] | None = None,
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    graceful_timeout: float = 10.0,
    log_dir: os.PathLike | str | None = None,
) -> Iterator[PetalsServer]:
    """Run a real Petals 2.2 server on 127.0.0.1 serving ``block_indices`` of ``checkpoint``.

    Starts a new swarm unless ``initial_peers`` is given. Yields once the server logged its
    multiaddr and ``Started`` (all handlers registered, runtime running). Always stops the
    server's whole process group on exit, also when the body raised.

    The server's log goes to a temp file (in ``log_dir`` if given): errors include its tail, an
    exception from the body gets it as a note, and it is kept unless the run was clean and
    ``log_dir`` was not given.

    Note: the DHT record may still say JOINING for a moment after ``Started``; Petals clients
    retry that by themselves, a client with no retries may want to poll for state ONLINE (2).
    """
    keep_log = True
    log_file = tempfile.NamedTemporaryFile("w+b", prefix="petals-server-", suffix=".log", dir=log_dir, delete=False)
    log_path = Path(log_file.name)
    cmd = [
        python,
        "-m",
        "petals.cli.run_server",
        str(checkpoint),
        "--host_maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--block_indices",
        block_indices,
        "--torch_dtype",
        "float32",
        "--device",
        "cpu",
        "--throughput",
        "1.0",  # given, or the server runs an internet speed test
        "--dht_prefix",
        dht_prefix,
    ]
    cmd += ["--initial_peers", *initial_peers] if initial_peers else ["--new_swarm"]
    cmd += list(extra_args)

    started = time.monotonic()
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=_clean_env(),
        start_new_session=True,  # own process group: teardown signals exactly this server's processes
    )
    log_file.close()  # the child holds its own descriptor

    def fail(message: str) -> PetalsError:
        log_tail = _tail(log_path.read_text(errors="replace"))
        return PetalsError(f"{message}\ncommand: {' '.join(cmd)}\n--- {log_path} (tail) ---\n{log_tail}")

    try:
        match = None
        deadline = started + timeout
        while True:
            text = log_path.read_text(errors="replace")
            match = match or _MADDR_RE.search(text)
            if match and _READY_RE.search(text, match.end()):
                break
            if process.poll() is not None:
                raise fail(f"Petals server exited with code {process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise fail(f"Petals server was not ready within {timeout:.0f} s")
            time.sleep(0.1)
        server = PetalsServer(
            maddr=match.group(1),
            peer_id=match.group(3),
            port=int(match.group(2)),
            process=process,
            log_path=log_path,
            startup_s=time.monotonic() - started,
        )
        try:
            yield server
        except BaseException as exc:  # the test body failed: point at the server's side of the story
            if hasattr(exc, "add_note"):
                exc.add_note(f"--- Petals server log {log_path} (tail) ---\n{server.log_tail(40)}")
            raise
    except BaseException:
        keep_log = True
        raise
    else:
        keep_log = log_dir is not None
    finally:
        _stop_process_group(process, graceful_timeout=graceful_timeout, kill_timeout=5.0)
        if not keep_log:  # a clean run in the default temp dir leaves nothing behind
            log_path.unlink(missing_ok=True)


# The end of every Petals-client script: ``remote`` and ``result`` are the script's.
_REPORT_AND_EXIT = r"""
layers = remote.model.layers
layers.sequence_manager.shutdown()
layers.sequence_manager.dht.shutdown()  # explicit, or interpreter exit prints event-loop noise
print("RESULT " + json.dumps(result), flush=True)
sys.stderr.flush()
# Petals 2.2's client can still hang in interpreter exit with its work done (a CI run printed RESULT,
# then nothing for 300 s); the caller kills this process group, its p2pd included, either way.
os._exit(0)
"""

_CLIENT_FWD_BWD = (
    r"""
import json, os, sys, time
import torch, transformers, petals

ckpt, peers, prefix, batch, seq, seed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
adapter_name, adapter_dir = sys.argv[7:9] if len(sys.argv) > 7 else (None, None)
torch.manual_seed(seed)
t0 = time.perf_counter()
remote = petals.DistributedLlamaForCausalLM.from_pretrained(
    ckpt, initial_peers=peers, dht_prefix=prefix, torch_dtype=torch.float32, max_retries=3, request_timeout=60,
    active_adapter=adapter_name,
)
connect_s = time.perf_counter() - t0
for p in remote.parameters():  # Petals freezes the local embeddings/head; we want their grads too
    p.requires_grad_(True)
local = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
if adapter_dir:  # the reference: this venv's peft (0.5) with the adapter the servers serve
    import peft
    local = peft.PeftModel.from_pretrained(local, adapter_dir).base_model.model.eval()
    for p in local.parameters():
        p.requires_grad_(True)

emb = torch.randn(batch, seq, local.config.hidden_size)
grad_logits = torch.randn(batch, seq, local.config.vocab_size)

def fwd_bwd(model):
    x = emb.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits = model(inputs_embeds=x).logits
    (logits * grad_logits).sum().backward()
    return dict(logits=logits.detach(), grad_inputs_embeds=x.grad, grad_lm_head=model.lm_head.weight.grad,
                grad_norm=model.model.norm.weight.grad)

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

ref = fwd_bwd(local)
t0 = time.perf_counter()
got = fwd_bwd(remote)
fwd_bwd_s = time.perf_counter() - t0
with torch.no_grad():  # how much the blocks change their input: a comparison is only meaningful if a lot
    hs = local(inputs_embeds=emb, output_hidden_states=True).hidden_states
result = dict(
    {f"rel_{k}": rel(got[k], ref[k]) for k in ref},
    connect_s=connect_s, fwd_bwd_s=fwd_bwd_s, first_block_change=rel(hs[1], emb),
)
"""
    + _REPORT_AND_EXIT
)


def petals_client_fwd_bwd(
    python: str,
    checkpoint: os.PathLike | str,
    initial_peers: Sequence[str],
    *,
    dht_prefix: str,
    batch: int = 2,
    seq: int = 8,
    seed: int = 1,
    timeout: float = 120.0,
    adapter: tuple[str, os.PathLike | str] | None = None,
) -> dict:
    """One forward+backward of a real Petals client through the swarm vs. the local HF model.

    Returns relative errors ``rel_logits``, ``rel_grad_inputs_embeds``, ``rel_grad_lm_head``,
    ``rel_grad_norm``, plus ``connect_s``, ``fwd_bwd_s`` and ``first_block_change``.
    Works against any server that speaks Petals 2.2's protocol (a Petals or a jaxseq server).
    With ``adapter`` (its name and folder), the client sends ``active_adapter`` and the local model is that
    adapter on the HF model, as the Petals venv's ``peft`` loads it.
    """
    stdout = run_in_petals_venv(
        python,
        _CLIENT_FWD_BWD,
        str(checkpoint),
        json.dumps(list(initial_peers)),
        dht_prefix,
        str(batch),
        str(seq),
        str(seed),
        *([adapter[0], str(adapter[1])] if adapter else []),
        timeout=timeout,
    )
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise PetalsError(f"Petals client printed no RESULT line:\n{_tail(stdout)}")
    return json.loads(results[-1][len("RESULT ") :])


_CLIENT_GENERATE = (
    r"""
import json, os, sys
import torch, transformers, petals

ckpt, peers, prefix, ids = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
max_new_tokens, num_beams = map(int, sys.argv[5:7])
adapter_name, adapter_dir = sys.argv[7:9] if len(sys.argv) > 7 else (None, None)
remote = petals.DistributedLlamaForCausalLM.from_pretrained(
    ckpt, initial_peers=peers, dht_prefix=prefix, torch_dtype=torch.float32, max_retries=3, request_timeout=60,
    active_adapter=adapter_name,
)
local = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
if adapter_dir:  # the reference: this venv's peft (0.5) with the adapter the servers serve
    import peft
    local = peft.PeftModel.from_pretrained(local, adapter_dir).base_model.model.eval()
options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, pad_token_id=0)
ids = torch.tensor(ids)
with torch.no_grad():
    want = local.generate(ids, **options)
    got = remote.generate(ids, **options)
result = dict(remote=got.tolist(), local=want.tolist())
"""
    + _REPORT_AND_EXIT
)


def petals_client_generate(
    python: str,
    checkpoint: os.PathLike | str,
    initial_peers: Sequence[str],
    ids: Sequence[Sequence[int]],
    *,
    dht_prefix: str,
    max_new_tokens: int = 16,
    num_beams: int = 1,
    timeout: float = 300.0,
    adapter: tuple[str, os.PathLike | str] | None = None,
) -> dict:
    """A real Petals client's ``generate`` (greedy, or beam search with ``num_beams``: it sends hypo_ids)
    through the swarm, and the same ``generate`` of the local transformers model: ``{"remote", "local"}``.
    With ``adapter`` (name, folder), as ``petals_client_fwd_bwd``."""
    stdout = run_in_petals_venv(
        python, _CLIENT_GENERATE, str(checkpoint), json.dumps(list(initial_peers)), dht_prefix,
        json.dumps([list(map(int, row)) for row in ids]), str(max_new_tokens), str(num_beams),
        *([adapter[0], str(adapter[1])] if adapter else []), timeout=timeout,
    )  # fmt: skip
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise PetalsError(f"Petals client printed no RESULT line:\n{_tail(stdout)}")
    return json.loads(results[-1][len("RESULT ") :])


if __name__ == "__main__":  # manual check: build the venv and print its python
    found, why = find_petals_python()
    print(found or why)
    sys.exit(0 if found else EXIT_UNAVAILABLE)
