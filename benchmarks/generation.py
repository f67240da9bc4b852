"""Generation: tokens per second of greedy ``generate`` (prompt 64 tokens, 64 new, batch 1 and 8) locally
under jit (a decode loop with a KV cache: embedding, blocks, head and argmax in one jitted step per
token), through real ``jaxseq-server`` processes on loopback (1 server x 8 blocks, 2 servers x 4
blocks), through real Petals 2.2 servers in the same layouts (from the Petals venv,
``tests/interop/petals_venv.sh``), all on one checkpoint; 8 concurrent sessions on one server (their
aggregate tokens per second, against one session's); where a token's time goes; and the server's
compile count after sessions of 3 other lengths.

Inference steps are small (one token's hidden states per row), so they always go over p2pd: same-host
memory files serve training's large tensors only. Every jaxseq row's tokens are checked equal to the
local loop's.

    python benchmarks/generation.py [--runs 3] [--no-petals]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from run import LAYOUTS, loopback_swarm

import jaxseq
from jaxseq.models.decoder import lm_logits, run_span_step

import petals_swarm
from common import CFG, machine, timed

PROMPT, NEW = 64, 64
BATCHES = (1, 8)
CONCURRENT = 8
PARTS = ("client", "serialize", "wire", "server compute", "server wait")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    batch: int
    seconds: float  # median of one generate call
    parts_s: dict | None = None  # per token (jaxseq rows)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * NEW / self.seconds


def prompt_ids(batch: int, length: int = PROMPT, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, CFG.vocab_size, (batch, length))


def local_generate(cfg: jaxseq.ModelConfig, params, head: dict):
    """Greedy generation without servers: one jitted step per token (the caches donated and updated in
    place), the baseline a swarm's generation is held to."""
    family, windows = jaxseq.family_of(cfg), tuple(cfg.window(i) for i in range(cfg.num_hidden_layers))

    @functools.partial(jax.jit, donate_argnums=1)
    def step(ids, caches, position):
        batch, n = ids.shape
        x = head["embed_tokens"][ids]
        no_prompts = jnp.zeros((len(params), batch, 0, cfg.hidden_size), x.dtype)
        positions = jnp.full(batch, position)
        out, caches = run_span_step(
            family.block_step, cfg, params, x, no_prompts, windows, caches, positions, positions + n
        )
        logits = lm_logits(out[:, -1], head["norm"], head["lm_head"], cfg.rms_norm_eps)
        return jnp.argmax(logits, axis=-1), caches

    def generate(ids: np.ndarray) -> np.ndarray:
        batch, prompt = ids.shape
        shape = (batch, cfg.num_key_value_heads, prompt + NEW, cfg.head_dim)
        caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in params]
        token, caches = step(jnp.asarray(ids), caches, 0)
        tokens = [token]
        for i in range(NEW - 1):
            token, caches = step(token[:, None], caches, prompt + i)
            tokens.append(token)
        return np.concatenate([ids, np.stack(jax.device_get(tokens), axis=1)], axis=1)

    return generate


def median_seconds(fn, runs: int) -> float:
    fn()  # compiles
    return statistics.median(timed(fn) for _ in range(runs))


def token_parts(manager: jaxseq.RemoteSequenceManager, generate) -> dict[str, float]:
    """Seconds per new token of one ``generate`` call: the client's own work (embedding, head, choosing the
    token, routing, bookkeeping), serializing (both sides), the wire, server compute, server queue wait."""
    since = len(manager.timings)
    wall = timed(generate)
    calls = [c for c in list(manager.timings)[since:] if c.stage == "inference"]
    in_calls = sum(c.serialize_s + c.round_trip_s + c.deserialize_s for c in calls)
    server = sum((c.server_compute_s or 0.0) + (c.server_wait_s or 0.0) + (c.server_io_s or 0.0) for c in calls)
    parts = {
        "client": wall - in_calls,
        "serialize": sum(c.serialize_s + c.deserialize_s + (c.server_io_s or 0.0) for c in calls),
        "wire": in_calls - server - sum(c.serialize_s + c.deserialize_s for c in calls),
        "server compute": sum(c.server_compute_s or 0.0 for c in calls),
        "server wait": sum(c.server_wait_s or 0.0 for c in calls),
    }
    return {part: seconds / NEW for part, seconds in parts.items()}


def concurrent_seconds(model: jaxseq.DistributedCausalLM, sessions: int, runs: int) -> float:
    """Median seconds for ``sessions`` clients (threads sharing one manager) to each generate at batch 1."""
    ids = [prompt_ids(1, seed=i) for i in range(sessions)]
    with ThreadPoolExecutor(sessions) as pool:

        def all_at_once():
            list(pool.map(lambda row: model.generate(row, max_new_tokens=NEW), ids))

        return median_seconds(all_at_once, runs)


def compiles_after_other_lengths(manager: jaxseq.RemoteSequenceManager, model: jaxseq.DistributedCausalLM) -> tuple:
    """The server's compile count before and after sessions of 3 other (prompt, new tokens) lengths."""
    peer = manager.records[0].peer
    before = manager.server_info(peer)["jaxseq_compiled"]
    for prompt, new in ((10, 5), (40, 30), (100, 20)):
        model.generate(prompt_ids(1, prompt), max_new_tokens=new)
    return before, manager.server_info(peer)["jaxseq_compiled"]


# Runs in the Petals venv: median seconds of Petals' greedy generate through the swarm, per batch.
_PETALS_GENERATE = r"""
import json, statistics, sys, time
import torch, petals
ckpt, peers, prefix = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
runs, new, ids_by_batch = int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6])
remote = petals.DistributedLlamaForCausalLM.from_pretrained(ckpt, initial_peers=peers, dht_prefix=prefix,
                                                             torch_dtype=torch.float32, max_retries=3)
out = {}
with torch.no_grad():
    for batch, ids in ids_by_batch.items():
        ids = torch.tensor(ids)
        generate = lambda: remote.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
        tokens = generate()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter(); generate(); times.append(time.perf_counter() - t0)
        out[batch] = dict(seconds=statistics.median(times), tokens=tokens.tolist())
remote.model.layers.sequence_manager.shutdown()
remote.model.layers.sequence_manager.dht.shutdown()
print("RESULT " + json.dumps(out), flush=True)
"""


def petals_generate(python: str, checkpoint: Path, spans, runs: int, prefix: str, log_dir: str) -> dict:
    """Per batch: median seconds of Petals' greedy generate through servers holding ``spans``, and its tokens."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(
            petals_swarm.petals_server(python, checkpoint, block_indices="{}:{}".format(*spans[0]),
                                       dht_prefix=prefix, log_dir=log_dir)
        )  # fmt: skip
        for span in spans[1:]:
            stack.enter_context(
                petals_swarm.petals_server(python, checkpoint, block_indices="{}:{}".format(*span),
                                           dht_prefix=prefix, initial_peers=[first.maddr], log_dir=log_dir)
            )  # fmt: skip
        ids = {batch: prompt_ids(batch).tolist() for batch in BATCHES}
        stdout = petals_swarm.run_in_petals_venv(
            python, _PETALS_GENERATE, str(checkpoint), json.dumps([first.maddr]), prefix, str(runs), str(NEW),
            json.dumps(ids), timeout=1800,
        )  # fmt: skip
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {int(batch): value for batch, value in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed generate calls per row (default 3)")
    parser.add_argument("--no-petals", action="store_true", help="leave out the Petals rows")
    args = parser.parse_args()
    python, no_petals_reason = petals_swarm.python_unless(args.no_petals)

    rows: list[Row] = []
    concurrency: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = petals_swarm.write_checkpoint(python, Path(tmp) / "llama")
        cfg, params = jaxseq.load_checkpoint(checkpoint)
        local = local_generate(cfg, params, jaxseq.load_head(checkpoint))
        want = {batch: local(prompt_ids(batch)) for batch in BATCHES}
        for batch in BATCHES:
            rows.append(Row("local jit", batch, median_seconds(functools.partial(local, prompt_ids(batch)), args.runs)))

        for layout, spans in LAYOUTS.items():
            with loopback_swarm(str(checkpoint), spans, f"bench-generate-{len(spans)}", False) as manager:
                model = jaxseq.DistributedCausalLM(checkpoint, manager)
                for batch in BATCHES:
                    generate = functools.partial(model.generate, prompt_ids(batch), max_new_tokens=NEW)
                    np.testing.assert_array_equal(generate(), want[batch])
                    seconds = median_seconds(generate, args.runs)
                    rows.append(Row(f"jaxseq {layout}", batch, seconds, token_parts(manager, generate)))
                if len(spans) == 1:
                    concurrency["one"] = median_seconds(
                        functools.partial(model.generate, prompt_ids(1), max_new_tokens=NEW), args.runs
                    )
                    peer = manager.records[0].peer
                    before = manager.server_info(peer)["jaxseq_inference_calls"]
                    concurrency["many"] = concurrent_seconds(model, CONCURRENT, args.runs)
                    after = manager.server_info(peer)["jaxseq_inference_calls"]
                    concurrency["steps per call"] = (after["steps"] - before["steps"]) / (
                        after["calls"] - before["calls"]
                    )
                    compiled = compiles_after_other_lengths(manager, model)

        if python is not None:
            for i, (layout, spans) in enumerate(LAYOUTS.items()):
                result = petals_generate(python, checkpoint, spans, args.runs, f"bench-petals-generate{i}", tmp)
                for batch in BATCHES:
                    np.testing.assert_array_equal(np.asarray(result[batch]["tokens"]), want[batch])
                    rows.append(Row(f"Petals 2.2 {layout}", batch, result[batch]["seconds"]))

    print(f"{machine()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"{cfg.num_hidden_layers} blocks, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"{cfg.num_attention_heads} heads, float32; greedy, prompt {PROMPT} tokens, {NEW} new; median of "
        f"{args.runs} generate calls; every row's tokens equal the local loop's\n"
    )
    local_rate = {r.batch: r.tokens_per_s for r in rows if r.name == "local jit"}
    print(
        f"{'generate':<20}{'batch':>6}{'tokens/s':>10}{'/ local':>9}   per token, ms: "
        + "".join(f"{p:>10}" for p in ("client", "serialize", "wire", "compute", "wait"))
    )
    for r in rows:
        parts = "".join(f"{1000 * r.parts_s[p]:>10.2f}" for p in PARTS) if r.parts_s else ""
        print(
            f"{r.name:<20}{r.batch:>6}{r.tokens_per_s:>10.1f}{r.tokens_per_s / local_rate[r.batch]:>9.2f}{'':18}{parts}"
        )
    if python is None:
        print(f"\n(no Petals rows: {no_petals_reason})")
    else:
        rate = {(r.name, r.batch): r.tokens_per_s for r in rows}
        print("\njaxseq / Petals tokens per second, same layout and checkpoint:")
        for layout in LAYOUTS:
            print(
                f"  {layout}: "
                + ", ".join(
                    f"batch {b} {rate[(f'jaxseq {layout}', b)] / rate[(f'Petals 2.2 {layout}', b)]:.2f}"
                    for b in BATCHES
                )
            )
    one_rate, many_rate = NEW / concurrency["one"], CONCURRENT * NEW / concurrency["many"]
    compute = {r.batch: r.parts_s["server compute"] for r in rows if r.name == "jaxseq 1 x 8" and r.parts_s}
    print(
        f"\n{CONCURRENT} concurrent sessions (batch 1) on one 1 x 8 server: {many_rate:.1f} tokens/s together, "
        f"one session {one_rate:.1f}: {many_rate / one_rate:.2f} x; {concurrency['steps per call']:.2f} session "
        f"steps per jitted call; the server's compute alone allows at most {8 * compute[1] / compute[8]:.2f} x "
        f"(8 rows cost {compute[8] / compute[1]:.2f} x one row)"
    )
    print(f"server compiles before / after sessions of 3 other lengths: {compiled[0]} / {compiled[1]}")


if __name__ == "__main__":
    main()
