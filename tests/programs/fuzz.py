"""A seeded fuzzer for a live jaxseq-server: malformed and random requests of many kinds, unary and
streamed, each bounded by a timeout, 127.0.0.1 only. Used by tests/test_fuzz.py (a short run in CI)
and as a script for the full count:

    python tests/programs/fuzz.py --count 10000 --seed 0     # starts its own server on a tiny random model
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from jaxseq.arrays import digest
from jaxseq.remote import protocol

# the fuzzed server's limits on clients' LoRA weights: "lora oversized" is over the bytes, "lora valid" far under
# and on tensors handed to it by other servers: "handoff valid" fills them
SERVER_ARGS = ["--max-tokens", "512", "--max-lora-rank", "64", "--lora-mb", "0.1", "--handoff-mb", "0.1"]
LORA_RANK_LIMIT = int(SERVER_ARGS[SERVER_ARGS.index("--max-lora-rank") + 1])

# answered normally
WELL_FORMED = (
    "valid", "ignorable metadata", "inference valid", "push to no session", "lora valid", "lora forward",
    "handoff valid",
)  # fmt: skip
MAY_BE_REFUSED = ("inference flood",)  # well-formed sessions that may find the attention cache full


def _tensor(rng: random.Random, shape, dtype=np.float32, fill=None) -> runtime_pb2.Tensor:
    array = (
        np.full(shape, fill, dtype)
        if fill is not None
        else np.asarray(np.random.default_rng(rng.randrange(2**32)).standard_normal(shape), dtype)
    )
    return protocol.serialize(array)


class Fuzzer:
    """Builds random requests for a server of ``num_blocks`` blocks of ``hidden`` under ``dht_prefix``."""

    def __init__(
        self, dht_prefix: str, num_blocks: int, hidden: int, max_tokens: int, max_lora_rank: int = LORA_RANK_LIMIT
    ):
        self.prefix, self.num_blocks, self.hidden, self.max_tokens = dht_prefix, num_blocks, hidden, max_tokens
        self.max_lora_rank = max_lora_rank

    def uids(self, rng: random.Random) -> str:
        start = rng.randrange(self.num_blocks)
        return protocol.span_uids(self.prefix, start, rng.randrange(start + 1, self.num_blocks + 1))

    def hidden_states(self, rng, batch=None, seq=None) -> runtime_pb2.Tensor:
        return _tensor(rng, (batch or rng.randint(1, 3), seq or rng.randint(1, 8), self.hidden))

    def requests(self) -> dict[str, Callable[[random.Random], tuple[str, object]]]:
        """kind -> builder returning (rpc name, ExpertRequest | list of them | raw bytes)."""
        fwd, bwd = protocol.RPC_FORWARD, protocol.RPC_BACKWARD
        H = self.hidden

        def req(uids, tensors, metadata=b""):
            return runtime_pb2.ExpertRequest(uid=uids, tensors=tensors, metadata=metadata)

        return {
            # (not to rpc_info: random bytes now and then parse as an ExpertUID without a uid, a well-formed request)
            "random bytes": lambda r: (r.choice([fwd, bwd]), os.urandom(r.randint(0, 2048))),
            "wrong uids": lambda r: (
                fwd,
                req(
                    r.choice(
                        [
                            "",
                            "x.0",
                            f"{self.prefix}.{self.num_blocks + 3}",
                            f"{self.prefix}.1 {self.prefix}.0",
                            f"{self.prefix}.0 {self.prefix}.2",
                            f"{self.prefix}.-1",
                            "ä" * 50,
                            f"{self.prefix}.",
                        ]
                    ),
                    [self.hidden_states(r)],
                ),
            ),
            "wrong ndim": lambda r: (fwd, req(self.uids(r), [_tensor(r, r.choice([(4,), (2, H), (1, 2, 3, H)]))])),
            "wrong hidden": lambda r: (fwd, req(self.uids(r), [_tensor(r, (1, 3, H + r.randint(1, 9)))])),
            "empty": lambda r: (fwd, req(self.uids(r), [_tensor(r, r.choice([(0, 3, H), (1, 0, H)]))])),
            "nan": lambda r: (
                r.choice([fwd, bwd]),
                req(self.uids(r), [_tensor(r, (1, 3, H), fill=r.choice([np.nan, np.inf, -np.inf]))] * 2),
            ),
            "int dtype": lambda r: (
                fwd,
                req(self.uids(r), [_tensor(r, (1, 3, H), dtype=r.choice([np.int32, np.int64, np.bool_]), fill=1)]),
            ),
            "tensor count": lambda r: (
                r.choice([fwd, bwd]),
                req(self.uids(r), [self.hidden_states(r, 1, 2)] * r.choice([0, 4, 5])),
            ),
            "bad prompts": lambda r: (
                fwd,
                req(
                    self.uids(r),
                    [
                        self.hidden_states(r, 1, 2),
                        _tensor(r, r.choice([(9, 1, 1, H), (1, 2, 1, H), (1, 1, 5, H), (1, 1, 1)])),
                    ],
                ),
            ),
            "grad shape": lambda r: (
                bwd,
                req(self.uids(r), [self.hidden_states(r, 1, 4), self.hidden_states(r, 1, 3)]),
            ),
            "too many tokens": lambda r: (fwd, req(self.uids(r), [_tensor(r, (1, self.max_tokens + 1, H))])),
            "declared size": lambda r: (
                fwd,
                req(
                    self.uids(r),
                    [
                        runtime_pb2.Tensor(
                            buffer=os.urandom(64), size=[r.choice([10**9, 2**31, 7])] * 3, dtype="float32"
                        )
                    ],
                ),
            ),
            "bad dtype string": lambda r: (
                fwd,
                req(
                    self.uids(r),
                    [
                        runtime_pb2.Tensor(
                            buffer=os.urandom(48),
                            size=[1, 3, 4],
                            dtype=r.choice(["float99", "", "object", "torch.float32"]),
                        )
                    ],
                ),
            ),
            "compression code": lambda r: (
                fwd,
                req(
                    self.uids(r),
                    [
                        runtime_pb2.Tensor(
                            buffer=os.urandom(64), size=[1, 2, 8], dtype="float32", compression=r.choice([3, 4, 5, 77])
                        )
                    ],
                ),
            ),
            # 0xc1 is never valid msgpack; a list is not a map; these output_compression values are no codes.
            "garbage metadata": lambda r: (
                fwd,
                req(
                    self.uids(r),
                    [self.hidden_states(r)],
                    r.choice(
                        [
                            b"\xc1" + os.urandom(r.randint(0, 64)),
                            MSGPackSerializer.dumps([1, 2]),
                            MSGPackSerializer.dumps({"output_compression": r.choice(["x", [99], [1, 2, 3]])}),
                            MSGPackSerializer.dumps({"active_adapter": "lora-we-do-not-have"}),
                            MSGPackSerializer.dumps({"points": "many"}),
                            MSGPackSerializer.dumps({"args_structure": "xxxxxxxxxx"}),
                            MSGPackSerializer.dumps({protocol.CACHE_ID_KEY: 1}),
                        ]
                    ),
                ),
            ),
            # Optional keys with values a server ignores, as Petals servers ignore unknown keys: answered normally.
            "ignorable metadata": lambda r: (
                fwd,
                req(
                    self.uids(r),
                    [self.hidden_states(r)],
                    MSGPackSerializer.dumps(
                        r.choice(
                            [
                                {"output_compression": None},
                                {protocol.CACHE_ID_KEY: r.choice(["y" * 999, ""])},
                                {"points": 3.5, "unknown": [1]},
                                {"args_structure": [[b"__T0"], {}]},
                            ]
                        )
                    ),
                ),
            ),
            # A backward that names a forward instead of sending its inputs: none was kept for this peer.
            "cached backward": lambda r: (
                bwd,
                req(
                    self.uids(r),
                    [self.hidden_states(r, 1, 2)] * r.choice([0, 1, 2]),
                    MSGPackSerializer.dumps(
                        r.choice(
                            [
                                {protocol.INPUTS_CACHED_KEY: True},
                                {
                                    protocol.INPUTS_CACHED_KEY: True,
                                    protocol.CACHE_ID_KEY: f"never-{r.randrange(10**9)}",
                                },
                            ]
                        )
                    ),
                ),
            ),
            "truncated stream": lambda r: (protocol.RPC_FORWARD_STREAM, self._truncated(r)),
            "stream random bytes": lambda r: (protocol.RPC_BACKWARD_STREAM, os.urandom(r.randint(0, 4096))),
            "valid": lambda r: (fwd, req(self.uids(r), [self.hidden_states(r)])),
            "inference valid": lambda r: (protocol.RPC_INFERENCE, (self._session(r, self._steps(r)), 0.0)),
            "inference bad opening": lambda r: (protocol.RPC_INFERENCE, (self._bad_opening(r), 0.0)),
            "inference bad step": lambda r: (protocol.RPC_INFERENCE, (self._bad_step(r), 0.0)),
            "inference flood": lambda r: (
                protocol.RPC_INFERENCE,
                (self._session(r, [self._hidden(r, 1, 2)], {"max_length": 8}), 0.5),
            ),  # fmt: skip
            "push to no session": lambda r: (
                protocol.RPC_PUSH,
                req(self.uids(r), [self.hidden_states(r)], MSGPackSerializer.dumps({"session_id": f"s{r.random()}"})),
            ),
            "push garbage": lambda r: (
                protocol.RPC_PUSH,
                req(self.uids(r), [self.hidden_states(r)], MSGPackSerializer.dumps(r.choice([{}, {"session_id": 5}]))),
            ),
            # server-to-server hops: tensors handed on (rpc_handoff), and calls that name hand-offs
            "handoff valid": lambda r: (
                protocol.RPC_HANDOFF,
                [req("", [self.hidden_states(r)], MSGPackSerializer.dumps({protocol.HANDOFF_KEY: f"h{r.random()}"}))],
            ),
            "handoff bad": lambda r: (
                protocol.RPC_HANDOFF,
                [
                    req(
                        "",
                        [self.hidden_states(r)] * r.choice([0, 1, 2]),
                        MSGPackSerializer.dumps(
                            r.choice([{}, {protocol.HANDOFF_KEY: 5}, {protocol.HANDOFF_KEY: "x" * 200}])
                        ),
                    )
                ],
            ),
            "hop metadata bad": lambda r: (
                r.choice([fwd, bwd]),
                req(
                    self.uids(r),
                    [self.hidden_states(r, 1, 2)] * 2,
                    MSGPackSerializer.dumps(
                        r.choice(
                            [
                                {protocol.HAND_TO_KEY: "peer"},
                                {protocol.HAND_TO_KEY: ["not a peer id", "id"]},
                                {protocol.HAND_TO_KEY: [1, 2, 3]},
                                {protocol.HAND_FROM_KEY: 7},
                                {protocol.HAND_FROM_KEY: "id"},  # but the tensor it replaces is sent
                            ]
                        )
                    ),
                ),
            ),
            # clients' LoRA weights (rpc_lora), and calls that name them
            "lora valid": lambda r: (protocol.RPC_LORA, self._lora(r)),
            "lora bad": lambda r: (protocol.RPC_LORA, self._bad_lora(r)),
            "lora oversized": lambda r: (
                protocol.RPC_LORA,
                self._lora(r, rank=self.max_lora_rank, names=("q_proj", "o_proj"), blocks=4),
            ),  # fmt: skip
            "lora forward": lambda r: (fwd, self._lora_forward(r)),
            "lora unknown": lambda r: (
                r.choice([fwd, bwd]),
                req(
                    protocol.span_uids(self.prefix, 0, 1),
                    [self.hidden_states(r, 1, 2)] * 2,
                    MSGPackSerializer.dumps(
                        r.choice(
                            [
                                {protocol.LORA_KEY: [f"{r.randrange(16**32):032x}"]},
                                {protocol.LORA_KEY: ["short"]},
                                {protocol.LORA_KEY: [f"{0:032x}"] * 3},
                                {protocol.LORA_KEY: "0" * 32},
                                {protocol.LORA_KEY: [f"{0:032x}"], "active_adapter": "some"},
                            ]
                        )
                    ),
                ),
            ),  # fmt: skip
        }

    # --- clients' LoRA weights -----------------------------------------------------------------
    def _lora_arrays(self, rng: random.Random, rank: int, names=("q_proj",), blocks: int = 1, fill=None) -> list:
        """Each block's ``{target}_lora_a``/``_b`` arrays of ``names`` (square projections of the hidden size)."""
        H, seed = self.hidden, rng.randrange(2**32)
        arrays = []
        for _ in range(blocks):
            for _ in names:
                for shape in ((H, rank), (rank, H)):
                    array = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
                    arrays.append(array if fill is None else np.full(shape, fill, np.float32))
                    seed += 1
        return arrays

    @staticmethod
    def _lora_names(names) -> list[str]:
        return [f"{target}_lora_{ab}" for target in names for ab in "ab"]

    def _lora(self, rng: random.Random, rank: int = 2, names=("q_proj",), blocks: int = 1) -> list:
        arrays = self._lora_arrays(rng, rank, names, blocks)
        metadata = {protocol.LORA_NAMES_KEY: self._lora_names(names)}
        return protocol.streamed_requests(protocol.span_uids(self.prefix, 0, blocks), arrays, metadata)

    def _bad_lora(self, rng: random.Random) -> list:
        H, uids = self.hidden, protocol.span_uids(self.prefix, 0, 1)
        names = self._lora_names(("q_proj",))
        arrays = self._lora_arrays(rng, 2)
        bad = rng.choice([
            (arrays, {}),  # no names
            (arrays, {protocol.LORA_NAMES_KEY: "q_proj_lora_a"}),
            (arrays, {protocol.LORA_NAMES_KEY: ["up_projj_lora_a", "up_projj_lora_b"]}),  # no such target
            (arrays, {protocol.LORA_NAMES_KEY: ["q_proj_lora_a", "q_proj_lora_a"]}),
            (arrays[:1], {protocol.LORA_NAMES_KEY: names[:1]}),  # a without b
            (arrays * 2, {protocol.LORA_NAMES_KEY: names}),  # tensors for 2 blocks, uids of 1
            ([np.zeros((H + 1, 2), np.float32), np.zeros((2, H), np.float32)], {protocol.LORA_NAMES_KEY: names}),
            ([np.zeros((H, 2), np.float32), np.zeros((3, H), np.float32)], {protocol.LORA_NAMES_KEY: names}),
            ([np.zeros((H, 2, 1), np.float32), np.zeros((2, H), np.float32)], {protocol.LORA_NAMES_KEY: names}),
            (self._lora_arrays(rng, self.max_lora_rank + 1), {protocol.LORA_NAMES_KEY: names}),  # rank over the limit
            (self._lora_arrays(rng, 2, fill=np.nan), {protocol.LORA_NAMES_KEY: names}),
            ([np.ones((H, 2), np.int32), np.ones((2, H), np.int32)], {protocol.LORA_NAMES_KEY: names}),
        ])  # fmt: skip
        return protocol.streamed_requests(uids, *bad)

    def _lora_forward(self, rng: random.Random) -> runtime_pb2.ExpertRequest:
        """A forward naming the LoRA weights given before the run (``fuzz``)."""
        weights = digest(dict(zip(self._lora_names(("q_proj",)), self._lora_arrays(random.Random(7), 2))))
        metadata = MSGPackSerializer.dumps({protocol.LORA_KEY: [weights]})
        return runtime_pb2.ExpertRequest(
            uid=protocol.span_uids(self.prefix, 0, 1), tensors=[self.hidden_states(rng)], metadata=metadata
        )

    # --- inference sessions: (requests, seconds to hold the stream open after the replies) -----
    def _hidden(self, rng: random.Random, batch: int, seq: int) -> runtime_pb2.Tensor:
        return _tensor(rng, (batch, seq, self.hidden))

    def _steps(self, rng: random.Random) -> list[runtime_pb2.Tensor]:
        return [self._hidden(rng, 1, rng.randint(1, 4))] + [self._hidden(rng, 1, 1) for _ in range(rng.randint(0, 3))]

    def _session(
        self, rng: random.Random, steps: list, opening: dict | None = None, last: tuple | None = None
    ) -> list[runtime_pb2.ExpertRequest]:
        """A session over all blocks: the opening (with ``opening`` metadata) and its steps, each a hidden
        states tensor (or ``last``: tensors and metadata of a final step), then Petals' "done"."""
        uids = protocol.span_uids(self.prefix, 0, self.num_blocks)
        # a well-behaved session waits for room in the attention cache, which floods fill
        default = {"max_length": 8, "alloc_timeout": 5.0, "session_id": f"{rng.random()}"}
        metadata = opening if opening is not None else default
        requests = [
            runtime_pb2.ExpertRequest(
                uid=uids, tensors=[step], metadata=MSGPackSerializer.dumps(metadata if i == 0 else {"step_id": str(i)})
            )
            for i, step in enumerate(steps)
        ]
        if last is not None:
            tensors, step_metadata = last
            requests.append(
                runtime_pb2.ExpertRequest(uid=uids, tensors=tensors, metadata=MSGPackSerializer.dumps(step_metadata))
            )
        return requests + [runtime_pb2.ExpertRequest()]

    def _bad_opening(self, rng: random.Random) -> list[runtime_pb2.ExpertRequest]:
        opening = rng.choice(
            [{}, {"max_length": 10**9}, {"max_length": -1}, {"max_length": "x"}, {"max_length": 8, "session_id": 5},
             {"max_length": 8, "alloc_timeout": "soon"}, {"max_length": 8, "points": "lots"}]
        )  # fmt: skip
        return self._session(rng, [self._hidden(rng, 1, 2)], opening)

    def _bad_step(self, rng: random.Random) -> list[runtime_pb2.ExpertRequest]:
        H = self.hidden
        bad = rng.choice(
            [
                ([_tensor(rng, (1, 1, H + 1))], {}),  # another hidden size
                ([_tensor(rng, (2, 1, H))], {}),  # another batch than the session's
                ([_tensor(rng, (1, 9, H))], {}),  # past max_length
                ([_tensor(rng, (1, 1, H), fill=np.nan)], {}),
                (
                    [_tensor(rng, (1, 1, H)), protocol.serialize(None), protocol.serialize(np.array([5]))],
                    {},
                ),  # hypo_ids
                ([_tensor(rng, (1, 1, H)), protocol.serialize(None), protocol.serialize(np.array([0.0]))], {}),
                ([_tensor(rng, (1, 1, H))], {"start_from_position": 99}),
                (
                    [_tensor(rng, (1, 1, H)), _tensor(rng, (self.num_blocks, 1, 3, H))],
                    {},
                ),  # prompts longer than the step
                ([_tensor(rng, (1, 1, H))], {"next_servers": [["not-a-peer", "s", 0, 1]]}),
            ]
        )
        return self._session(rng, [self._hidden(rng, 1, 2)], last=bad)

    def _truncated(self, rng: random.Random) -> list[runtime_pb2.ExpertRequest]:
        tensor = self.hidden_states(rng, 4, 64)
        parts = protocol.tensor_parts(protocol.deserialize(tensor), chunk_bytes=1024)
        keep = parts[: rng.randrange(1, len(parts))]
        return [runtime_pb2.ExpertRequest(uid=self.uids(rng), tensors=[runtime_pb2.Tensor(**p)]) for p in keep]


async def _send(p2p: P2P, peer: PeerID, rpc: str, payload, timeout: float) -> str:
    """Send one request; returns 'error', 'closed', 'ok' or 'timeout'."""

    async def unary() -> str:
        if isinstance(payload, bytes):
            await p2p._client.call_unary_handler(peer, rpc, payload)
        else:
            await p2p.call_protobuf_handler(peer, rpc, payload, runtime_pb2.ExpertResponse)
        return "ok"

    async def stream() -> str:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, rpc)
        try:
            if isinstance(payload, bytes):
                writer.write(payload)
                writer.write_eof()  # nothing more comes: the server must not wait for the rest of a message
            else:  # ended by hivemind's end-of-stream message: closing our side now would cancel the handler
                for request in payload:
                    await P2P.send_protobuf(request, writer)
                await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
            await writer.drain()
            response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            return "error" if error is not None else "ok"
        finally:
            writer.close()

    async def session() -> str:
        """An inference session: every step's reply must come (an error reply ends it), then the stream is
        held open ``hold`` seconds more, as a client between its steps."""
        requests, hold = payload
        _, reader, writer = await p2p.call_binary_stream_handler(peer, rpc)
        try:
            for request in requests:
                await P2P.send_protobuf(request, writer)
            await writer.drain()
            for _ in [r for r in requests if r.tensors]:
                response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                if error is not None:
                    return "error"
            await asyncio.sleep(hold)
            return "ok"
        finally:
            writer.close()

    try:
        if rpc == protocol.RPC_INFERENCE:
            return await asyncio.wait_for(session(), timeout)
        streamed = rpc.endswith("_stream") or rpc in (protocol.RPC_LORA, protocol.RPC_HANDOFF)
        return await asyncio.wait_for(stream() if streamed else unary(), timeout)
    except asyncio.TimeoutError:
        return "timeout"
    except asyncio.IncompleteReadError:
        return "closed"
    except Exception:  # an error reply surfaces as P2PHandlerError, or as a daemon/protocol error
        return "error"


async def fuzz(
    maddr: str,
    dht_prefix: str,
    num_blocks: int,
    hidden: int,
    max_tokens: int,
    count: int,
    seed: int,
    time_budget: float,
    timeout: float = 10.0,
    concurrency: int = 8,
) -> dict:
    """Send ``count`` requests (or stop at ``time_budget`` seconds); returns counts by kind and outcome."""
    peer = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
    p2p = await P2P.create(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    fuzzer = Fuzzer(dht_prefix, num_blocks, hidden, max_tokens)
    # the weights "lora forward" names, given first (the server's --lora-mb keeps them beside every "lora valid")
    await _send(p2p, peer, protocol.RPC_LORA, fuzzer._lora(random.Random(7)), timeout)
    builders = fuzzer.requests()
    rng = random.Random(seed)
    plan = [
        (kind, builders[kind](random.Random(rng.randrange(2**32)))) for kind in rng.choices(list(builders), k=count)
    ]
    results: collections.Counter = collections.Counter()
    deadline = time.monotonic() + time_budget
    queue = iter(plan)

    async def worker():
        for kind, (rpc, payload) in queue:
            if time.monotonic() > deadline:
                return
            results[kind, await _send(p2p, peer, rpc, payload, timeout)] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await p2p.shutdown()
    return dict(results)


def main() -> int:
    import psutil

    import jaxseq
    from jaxseq.testing.launch import ServerProcess

    parser = argparse.ArgumentParser(description="fuzz a live jaxseq-server (started here on a tiny random model)")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=1800.0)
    args = parser.parse_args()
    cfg = jaxseq.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = jaxseq.random_checkpoint(f"{tmp}/llama", cfg)
        server = ServerProcess(str(checkpoint), (0, 4), "fuzz", None, ["--throughput", "1", *SERVER_ARGS]).wait_ready()
        try:
            run = lambda: asyncio.run(fuzz(server.maddr, "fuzz", 4, 32, 512, args.count, args.seed, args.time_budget))  # noqa: E731
            rss_start = psutil.Process(server.process.pid).memory_info().rss
            start = time.monotonic()
            first = run()  # also fills the server's bounded compile cache
            elapsed = time.monotonic() - start
            rss_before = psutil.Process(server.process.pid).memory_info().rss
            results = run()  # the same requests again: memory must stay flat
            rss_after = psutil.Process(server.process.pid).memory_info().rss
            alive = server.process.poll() is None
        finally:
            server.kill()
    outcomes = collections.Counter()
    for (kind, outcome), n in sorted(first.items()):
        outcomes[outcome] += n
        print(f"{kind:<22}{outcome:<10}{n:>7}")
    second = collections.Counter(o for (_, o), n in results.items() for _ in range(n))
    print(f"\nfirst pass: {sum(first.values())} requests in {elapsed:.0f} s: {dict(outcomes)}")
    print(f"second pass (same requests): {dict(second)}; server alive: {alive}")
    print(
        f"server RSS: {rss_start / 2**20:.0f} MiB at start, {rss_before / 2**20:.0f} MiB after the first pass "
        f"(compile cache filled), {rss_after / 2**20:.0f} MiB after the second"
    )
    outcomes += second
    malformed_ok = sum(n for (kind, outcome), n in results.items() if outcome == "ok" and kind not in WELL_FORMED)
    return 0 if alive and outcomes["timeout"] == 0 and malformed_ok == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
