"""Same-host shared-memory transfers: validated by servers, cleaned up by clients, equal results."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jaxseq
from jaxseq.remote import RemoteSequenceManager, shm
from jaxseq.remote.protocol import ProtocolError
from conftest import rel_err


def _leftovers() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob("jaxseq-*")}


def test_segments_round_trip_and_are_removed():
    before = _leftovers()
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    with shm.Segments([x], [((2, 3, 4), np.float32)]) as segments:
        (read_back,) = shm.read(segments.inputs)
        np.testing.assert_array_equal(read_back, x)
        shm.write(segments.outputs, [x * 2])
        np.testing.assert_array_equal(segments.results()[0], x * 2)
    assert _leftovers() == before


@pytest.mark.parametrize(
    "descriptor,message",
    [
        (["../etc/passwd", "float32", [1]], "not a jaxseq segment name"),
        (["jaxseq-" + "0" * 32, "object", [1]], "dtype"),
        (["jaxseq-" + "0" * 32, "float32", [1, -1]], "shape"),
        (["jaxseq-" + "0" * 32, "float32", [2, 3]], "can't be opened"),
        ("jaxseq", "must be"),
    ],
)
def test_servers_reject_bad_descriptors(descriptor, message):
    with pytest.raises(ProtocolError, match=message):
        shm.read([descriptor])


def test_size_must_match_the_declared_shape():
    with shm.Segments([np.zeros((2, 2), np.float32)], []) as segments:
        name = segments.inputs[0][0]
        with pytest.raises(ProtocolError, match="does not hold 64 bytes"):
            shm.read([[name, "float32", [4, 4]]])
        with pytest.raises(ProtocolError, match="result segment"):
            shm.write([[name, "float32", [2, 2]]], [np.zeros((3, 3), np.float32)])


@pytest.mark.network
@pytest.mark.parametrize("shared_memory", [True, False])
def test_same_host_calls_equal_wire_calls(checkpoint, start_servers, shared_memory):
    _, cfg, params = checkpoint
    servers, prefix = start_servers([(0, 2), (2, 4)])
    before = _leftovers()
    config = jaxseq.ClientConfig(shared_memory=shared_memory)
    with RemoteSequenceManager([servers[0].maddr], prefix, config) as manager:
        x = jax.random.normal(jax.random.key(0), (3, 9, cfg.hidden_size))
        prompts = 0.5 * jax.random.normal(jax.random.key(1), (4, 3, 2, cfg.hidden_size))
        f = lambda x, p: jax.numpy.sum(jax.numpy.sin(jaxseq.remote_sequential(x, p, manager)))  # noqa: E731
        g = lambda x, p: jax.numpy.sum(jax.numpy.sin(jaxseq.local_sequential(cfg, params, x, p)))  # noqa: E731
        got = jax.jit(jax.grad(f, argnums=(0, 1)))(x, prompts)
        want = jax.grad(g, argnums=(0, 1))(x, prompts)
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
        assert [t.transport for t in manager.timings] == ["shm" if shared_memory else "unary"] * 4
    assert _leftovers() == before
