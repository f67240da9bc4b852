"""Client-side distrust on an in-process swarm: cross-checks catch a server whose answers are
plausible but wrong, the outlier is banned, and every step still equals local."""

from __future__ import annotations

import numpy as np
import pytest

import jaxseq
from jaxseq.client.verification import agree, tolerance

from helpers import matches, random_inputs, training_step


def _make_noisy(server, scale=1e-3):
    honest_forward, honest_backward = server.backend.forward, server.backend.backward

    def forward(*args):
        out = honest_forward(*args)
        return out + scale * np.abs(out).mean() * np.random.default_rng(0).standard_normal(out.shape).astype(out.dtype)

    def backward(*args):
        grads = honest_backward(*args)
        return grads._replace(inputs=grads.inputs * (1 + scale))

    server.backend.forward, server.backend.backward = forward, backward


def _step(manager):
    return training_step(lambda x, p: jaxseq.remote_sequential(x, p, manager))


def _reference(cfg, params, x, prompts):
    return training_step(lambda x, p: jaxseq.local_sequential(cfg, params, x, p))(x, prompts)


def test_tolerance_follows_dtype():
    a = np.ones(100, np.float32)
    assert agree((a,), (a * (1 + 0.5 * tolerance(np.float32)),))
    assert not agree((a,), (a * (1 + 2 * tolerance(np.float32)),))
    assert tolerance(np.float16) > tolerance(np.float32)
    assert not agree((a, None), (a, a))


def test_noisy_server_is_outvoted_and_banned(tiny_cfg, tiny_params, make_swarm):
    config = jaxseq.ClientConfig(verify_fraction=1.0, min_backoff=0.01, ban_timeout=0.0)
    swarm, manager = make_swarm([(0, 4), (0, 4), (0, 4)], config, throughputs=[3.0, 2.0, 1.0])
    noisy = swarm.servers[0]  # the fastest: routing tries it first every time (bans last 0 s here)
    _make_noisy(noisy)
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)
    want = _reference(tiny_cfg, tiny_params, x, prompts)
    for _ in range(3):
        assert matches(_step(manager)(x, prompts), want)
    answered = manager.outcomes[noisy.name, "ok"]
    assert answered >= 3 and manager.outcomes[noisy.name, "outvoted"] == answered  # caught every time
    assert manager.disagreements == answered


def test_with_no_third_server_the_doubted_answer_is_retried_elsewhere(tiny_cfg, tiny_params, make_swarm):
    config = jaxseq.ClientConfig(verify_fraction=1.0, min_backoff=0.01, ban_timeout=60.0)
    swarm, manager = make_swarm([(0, 4), (0, 4)], config, throughputs=[2.0, 1.0])
    _make_noisy(swarm.servers[0])
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)
    assert matches(_step(manager)(x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))
    assert manager.outcomes[swarm.servers[0].name, "outvoted"] == 1
    assert manager.unverified_spans >= 1  # after the ban, the honest server had nobody to be checked against


def test_without_verification_a_noisy_server_goes_unnoticed(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 4), (0, 4)], throughputs=[2.0, 1.0])
    _make_noisy(swarm.servers[0])
    x, prompts = random_inputs(tiny_cfg, 2, 5, 2)
    assert not matches(_step(manager)(x, prompts), _reference(tiny_cfg, tiny_params, x, prompts))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_verification_costs_extra_calls_in_proportion(tiny_cfg, make_swarm, fraction):
    config = jaxseq.ClientConfig(verify_fraction=fraction, max_tokens_in_batch=8)
    swarm, manager = make_swarm([(0, 4), (0, 4)], config)
    x, prompts = random_inputs(tiny_cfg, 16, 4, 1)  # 8 micro-batches
    _step(manager)(x, prompts)
    calls = sum(s.calls["forward"] + s.calls["backward"] for s in swarm.servers)
    assert calls == 16 + manager.verified_spans
    if fraction == 0.0:
        assert manager.verified_spans == 0
    elif fraction == 1.0:
        assert manager.verified_spans == 16
    else:
        assert 0 < manager.verified_spans < 16
