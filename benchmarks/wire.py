"""How fast hidden states move between a client and a ``jaxseq-server`` on this machine, against memcpy.

One server holds one block; the client sends forwards of 8, 16 and 64 MiB of float32 hidden states
to it (uncompressed through ``/dev/shm``-style memory files and through p2pd, and compressed through
p2pd) and times each call. Moving time is the call's wall time less the server's compute and queue
wait as the server reports them: it still holds both sides' parsing and checks (shape, dtype,
finiteness). Bytes moved are the request's and the reply's raw tensors. Ratios are to numpy copies
warm (in cache), cold (out of cache, as this data is) and into fresh pages (as into a new buffer).

    python benchmarks/wire.py [--calls 5]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import mmap
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

import jaxseq
from jaxseq import RemoteSequenceManager
from jaxseq.client.routing import Span
from jaxseq.testing.launch import ServerProcess

from common import CFG, machine

SIZES_MIB = (8, 16, 64)
TRANSPORTS = {  # name: (shared_memory, compression)
    "same-host memory files": (True, "none"),
    "p2pd (Petals' wire)": (False, "none"),
    "p2pd, float16": (False, "float16"),
    "p2pd, meanstd16": (False, "meanstd16"),
    "p2pd, uniform8bit": (False, "uniform8bit"),
    "p2pd, quantile8bit": (False, "quantile8bit"),
}


@dataclasses.dataclass(frozen=True)
class WireResult:
    transport: str
    mib: int
    moving_s: float  # median over calls
    nbytes: int  # raw bytes moved by one call, both ways
    parts_s: dict  # median seconds: client (de)serialize, server io, wire
    rel_err: float  # of the output against the uncompressed call's

    @property
    def gbps(self) -> float:
        return self.nbytes / self.moving_s / 1e9


def _median_seconds(fn: Callable[[], object], calls: int = 15, before: Callable[[], object] = lambda: None) -> float:
    """Median seconds of ``fn`` over ``calls`` calls, each after an untimed ``before``."""
    before(), fn()
    seconds = []
    for _ in range(calls):
        before()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


MEMCPY = {  # baseline: what it copies
    "warm": "source and destination in cache (copied just before)",
    "cold": "after a 256 MiB sweep evicted both, as the server's compute does between calls",
    "fresh": "into newly mapped pages (page faults included), as into a new buffer",
}


def memcpy_gbps(nbytes: int) -> dict[str, float]:
    """numpy copies of ``nbytes`` in the three cache states of ``MEMCPY``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.ones_like(src)
    sweep = np.ones((256 << 20) // 4, np.float32)
    fresh = lambda: np.copyto(np.frombuffer(mmap.mmap(-1, nbytes), np.float32), src)  # noqa: E731
    return {
        "warm": nbytes / _median_seconds(lambda: np.copyto(dst, src)) / 1e9,
        "cold": nbytes / _median_seconds(lambda: np.copyto(dst, src), before=lambda: np.add(sweep, 1, out=sweep)) / 1e9,
        "fresh": nbytes / _median_seconds(fresh) / 1e9,
    }


@contextlib.contextmanager
def one_block_server():
    """A ``jaxseq-server`` holding block 0 of a one-block model of the benchmark's width."""
    cfg = dataclasses.replace(CFG, num_hidden_layers=1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(jaxseq.random_checkpoint(f"{tmp}/llama", cfg, seed=0))
        server = ServerProcess(checkpoint, (0, 1), "bench-wire", None, ["--throughput", "1000"]).wait_ready()
        try:
            yield server
        finally:
            server.terminate()


def measure(server: ServerProcess, calls: int) -> list[WireResult]:
    results: list[WireResult] = []
    reference: dict[int, np.ndarray] = {}
    for transport, (shared_memory, compression) in TRANSPORTS.items():
        config = jaxseq.ClientConfig(
            request_timeout=300.0,
            deadline=600.0,
            max_tokens_in_batch=1 << 20,
            shared_memory=shared_memory,
            compression=compression,
        )
        with RemoteSequenceManager([server.maddr], "bench-wire", config) as manager:
            span = Span(manager.records[0].peer, 0, 1)
            for mib in SIZES_MIB:
                x = np.random.default_rng(mib).standard_normal((mib, 512, CFG.hidden_size), dtype=np.float32)
                prompts = np.zeros((1, mib, 0, CFG.hidden_size), np.float32)
                forward = functools.partial(_forward, manager, span, x, prompts)
                out = forward()
                reference.setdefault(mib, out)
                timings = []
                for _ in range(calls):
                    since = len(manager.timings)
                    forward()
                    (call,) = list(manager.timings)[since:]
                    timings.append(call)
                results.append(_result(transport, mib, timings, out, reference[mib]))
    return results


def _forward(manager: RemoteSequenceManager, span: Span, x: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    return manager.run(manager.forward(span, x, prompts, timeout=300.0))


def _result(transport: str, mib: int, timings: list, out: np.ndarray, reference: np.ndarray) -> WireResult:
    def median(part: Callable) -> float:
        return statistics.median(part(c) for c in timings)

    server_side = lambda c: c.server_compute_s + c.server_wait_s  # noqa: E731
    total = lambda c: c.serialize_s + c.round_trip_s + c.deserialize_s  # noqa: E731
    parts = {
        "client (de)serialize": median(lambda c: c.serialize_s + c.deserialize_s),
        "server parse/check/write": median(lambda c: c.server_io_s),
        "wire": median(lambda c: c.round_trip_s - server_side(c) - c.server_io_s),
    }
    return WireResult(
        transport,
        mib,
        median(lambda c: total(c) - server_side(c)),
        (mib << 20) * 2,
        parts,
        float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
    )


def print_table(results: list[WireResult]) -> None:
    memcpy = {mib: memcpy_gbps(mib << 20) for mib in SIZES_MIB}
    print("hidden states to a server and back (float32; one block's forward, its compute not counted).")
    print(f"  memcpy here, GB/s at {' / '.join(str(mib) for mib in SIZES_MIB)} MiB:")
    for state, what in MEMCPY.items():
        print(f"    {state:<6}" + " / ".join(f"{memcpy[mib][state]:4.1f}" for mib in SIZES_MIB) + f"   {what}")
    print(
        f"  {'transport':<24}{'MiB':>5}{'ms':>8}{'GB/s':>7}"
        + "".join(f"{'/ ' + state:>8}" for state in MEMCPY)
        + f"{'client ser':>11}{'server io':>10}{'wire':>8}{'rel err':>10}"
    )
    for r in results:
        ser, io, wire = (1000 * v for v in r.parts_s.values())
        print(
            f"  {r.transport:<24}{r.mib:>5}{1000 * r.moving_s:>8.1f}{r.gbps:>7.2f}"
            + "".join(f"{r.gbps / memcpy[r.mib][state]:>8.2f}" for state in MEMCPY)
            + f"{ser:>11.1f}{io:>10.1f}{wire:>8.1f}{r.rel_err:>10.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5, help="timed calls per size and transport (default 5)")
    args = parser.parse_args()
    with one_block_server() as server:
        results = measure(server, args.calls)
    print(f"{machine()}; {time.strftime('%Y-%m-%d')}\n")
    print_table(results)


if __name__ == "__main__":
    main()
