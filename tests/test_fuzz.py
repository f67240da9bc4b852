"""A short seeded fuzz run against a live server (the full 10,000-request run is ``python tests/programs/fuzz.py``)."""

from __future__ import annotations

import asyncio
import collections

import jax
import numpy as np
import psutil
import pytest

import jaxseq
from jaxseq import RemoteSequenceManager

from helpers import rel_err
from programs.fuzz import MAY_BE_REFUSED, SERVER_ARGS, WELL_FORMED, fuzz

pytestmark = pytest.mark.network
COUNT = 1000
# The server compiles block functions per (span length, shape bucket) it sees: a bounded cache, filled by
# the first pass. A second pass of the same requests must not grow the server's memory beyond this.
RSS_GROWTH_BOUND = 32 * 2**20


def test_fuzzed_server_survives_and_still_answers_correctly(checkpoint, start_servers):
    _, cfg, params = checkpoint
    # a small attention cache (room for 2 sessions of 8 positions), so that floods of sessions fill it
    args = [*SERVER_ARGS, "--attn-cache-tokens", "16", "--inference-max-length", "256"]
    (server,), prefix = start_servers([(0, 4)], extra_args=args)
    run = lambda: asyncio.run(fuzz(server.maddr, prefix, 4, cfg.hidden_size, 512, COUNT, seed=0, time_budget=300.0))  # noqa: E731
    run()
    rss_before = psutil.Process(server.process.pid).memory_info().rss
    results = run()
    outcomes = collections.Counter()
    for (_, outcome), n in results.items():
        outcomes[outcome] += n
    assert sum(outcomes.values()) == COUNT
    assert outcomes["timeout"] == 0, results  # every request answered or closed within its timeout
    assert not [(k, o) for (k, o) in results if o == "ok" and k not in WELL_FORMED + MAY_BE_REFUSED], (
        results
    )  # nothing malformed accepted
    for kind in WELL_FORMED:  # and everything well-formed answered
        assert results.get((kind, "ok"), 0) > 0 and not [o for (k, o) in results if k == kind and o != "ok"], results
    assert server.process.poll() is None
    assert psutil.Process(server.process.pid).memory_info().rss - rss_before < RSS_GROWTH_BOUND
    with RemoteSequenceManager([server.maddr], prefix) as manager:  # and it still computes correctly
        x = jax.random.normal(jax.random.key(0), (2, 5, cfg.hidden_size))
        want = jaxseq.local_sequential(cfg, params, x)
        y = jax.jit(lambda x: jaxseq.remote_sequential(x, None, manager))(x)
        assert rel_err(y, want) < 1e-5
        with manager.inference_session(max_length=8, batch_size=2) as session:  # sessions too
            assert rel_err(session.step(np.asarray(x)), want) < 1e-5
        info = manager.server_info(server.peer_id)
        assert info["cache_tokens_available"] == 2 * 16 * 4  # every fuzzed session's cache was freed
        lora_mb = float(SERVER_ARGS[SERVER_ARGS.index("--lora-mb") + 1])
        assert 0 < info["jaxseq_lora"]["bytes"] <= lora_mb * 2**20  # clients' LoRA weights kept within --lora-mb
        handoff_mb = float(SERVER_ARGS[SERVER_ARGS.index("--handoff-mb") + 1])
        assert 0 < info["jaxseq_handoffs"]["bytes"] <= handoff_mb * 2**20  # hand-offs kept within --handoff-mb
