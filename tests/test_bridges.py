"""bridges: zero-copy DLPack conversion, torch training through the swarm, and JAX <-> torch autograd."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridges
import jaxseq

from helpers import random_inputs, rel_err

TOL = 1e-5

# name -> (numpy dtype, torch dtype, needs jax_enable_x64)
DTYPES = {
    "float32": (np.float32, torch.float32, False),
    "bfloat16": (jnp.bfloat16, torch.bfloat16, False),
    "float16": (np.float16, torch.float16, False),
    "int32": (np.int32, torch.int32, False),
    "int64": (np.int64, torch.int64, True),
    "bool": (np.bool_, torch.bool, False),
}


def _dtype_context(name: str):
    return jax.enable_x64(True) if DTYPES[name][2] else contextlib.nullcontext()


def _values(name: str, n: int = 64) -> np.ndarray:
    np_dtype = DTYPES[name][0]
    if np_dtype is np.bool_:
        return np.arange(n) % 3 == 0
    return (np.arange(n) % 7 - 3).astype(np_dtype)


def _written(name: str):
    """A value different from any in ``_values`` (True for bool: index 1 holds False)."""
    return True if name == "bool" else 5


# --- zero-copy, both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DTYPES)
def test_to_torch_shares_memory(name):
    with _dtype_context(name):
        a = jax.device_put(jnp.asarray(_values(name)), jax.devices("cpu")[0])
        t = bridges.to_torch(a)
        assert t.dtype == DTYPES[name][1] and t.device.type == "cpu"
        assert t.data_ptr() == a.unsafe_buffer_pointer()
        np.testing.assert_array_equal(t.float().numpy(), np.asarray(a, np.float32))
        # JAX arrays are immutable to JAX code, but the memory is shared: a torch write shows through.
        t[1] = _written(name)
        assert a[1] == _written(name)


@pytest.mark.parametrize("name", DTYPES)
def test_to_jax_shares_memory(name):
    with _dtype_context(name):
        t = torch.tensor(_values(name).astype(np.float32)).to(DTYPES[name][1])  # torch-owned, 64-byte aligned
        a = bridges.to_jax(t)
        assert a.dtype == DTYPES[name][0] and a.devices() == {jax.devices("cpu")[0]}
        assert a.unsafe_buffer_pointer() == t.data_ptr()
        t[1] = _written(name)  # torch writes into memory it owns; JAX reads it afterwards
        assert a[1] == _written(name)


def test_int64_needs_x64_on_the_jax_side():
    t = torch.tensor([2**40, 5])
    # What to_jax guards against: JAX alone narrows to int32 silently, even when asked not to copy.
    narrowed = jax.dlpack.from_dlpack(t, copy=False)
    assert narrowed.dtype == jnp.int32 and int(narrowed[0]) == 0
    message = r"JAX can't hold torch.int64 while jax_enable_x64 is off.*tensor.to\(torch.int32\)"
    with pytest.raises(ValueError, match=message):
        bridges.to_jax(t)
    with pytest.raises(ValueError, match=message):  # a copy never changes values
        bridges.to_jax(t, copy=True)
    # Without x64 JAX has no int64 arrays to begin with: an int64 numpy array becomes int32.
    assert bridges.to_torch(jnp.asarray(np.array([1, 2], np.int64))).dtype == torch.int32
    with jax.enable_x64(True):
        a = bridges.to_jax(t)
        assert a.dtype == jnp.int64 and int(a[0]) == 2**40 and a.unsafe_buffer_pointer() == t.data_ptr()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: torch.arange(12.0).reshape(3, 4).T, r"it is not contiguous \(strides \(1, 4\)\)"),
        (lambda: torch.arange(65.0)[1:], "its data is not 64-byte aligned, which JAX needs on CPU"),
        (lambda: torch.ones(4, requires_grad=True), r"it requires grad .* tensor.detach\(\) shares its memory"),
    ],
    ids=["non-contiguous", "misaligned", "requires-grad"],
)
def test_to_jax_copies_only_when_asked(make, message):
    t = make()
    with pytest.raises(ValueError, match=f"to_jax can't share this tensor's memory: {message}.*Pass copy=True"):
        bridges.to_jax(t)
    for copy in (True, None):
        a = bridges.to_jax(t, copy=copy)
        np.testing.assert_array_equal(np.asarray(a), t.detach().numpy())
        assert a.unsafe_buffer_pointer() != t.data_ptr()


def test_to_jax_of_a_device_jax_does_not_see():
    with pytest.raises(ValueError, match="it is on meta, a device JAX doesn't see"):
        bridges.to_jax(torch.ones(3, device="meta"))


def test_copy_true_is_independent_both_ways():
    a = jnp.arange(64.0)
    t = bridges.to_torch(a, copy=True)
    assert t.data_ptr() != a.unsafe_buffer_pointer()
    t[0] = 100.0
    assert a[0] == 0.0
    t2 = torch.arange(64.0)
    a2 = bridges.to_jax(t2, copy=True)
    assert a2.unsafe_buffer_pointer() != t2.data_ptr()
    t2[0] = 100.0
    assert a2[0] == 0.0


def test_to_torch_errors():
    with pytest.raises(TypeError, match="to_torch needs a concrete array, got a tracer"):
        jax.jit(bridges.to_torch)(jnp.ones(2))
    deleted = jnp.ones(2)
    deleted.delete()
    with pytest.raises(ValueError, match="deleted jax.Array"):
        bridges.to_torch(deleted)
    with pytest.raises(ValueError, match="torch can't import a int4 array through DLPack"):
        bridges.to_torch(jnp.zeros(4, jnp.int4))
    with pytest.raises(TypeError, match="to_torch takes a jax.Array, got ndarray"):
        bridges.to_torch(np.ones(2))
    with pytest.raises(TypeError, match="to_jax takes a torch.Tensor, got ndarray"):
        bridges.to_jax(np.ones(2))


def test_to_torch_of_a_sharded_array():
    # Needs two CPU devices, which must be set before JAX starts: run in a fresh process.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, bridges
        from jax.sharding import NamedSharding, PartitionSpec as P
        a = jax.device_put(jnp.arange(8.0), NamedSharding(jax.make_mesh((2,), ("d",)), P("d")))
        try:
            bridges.to_torch(a)
        except ValueError as e:
            print(e)
        print(bridges.to_torch(a, copy=True).tolist())
        """
    )
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "to_torch can't share this array's memory: it is sharded over 2 devices and DLPack carries one buffer. "
        "Pass copy=True to copy it",
        str([float(i) for i in range(8)]),
    ]


# --- CUDA: skipped with a reason on machines without a GPU seen by both frameworks --------------------


def _require_cuda_in_both():
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__})")
    try:
        jax.devices("gpu")
    except RuntimeError:
        pytest.skip(f"needs a CUDA GPU: JAX sees no GPU (devices: {jax.devices()})")


@pytest.mark.gpu
@pytest.mark.parametrize("name", DTYPES)
def test_cuda_to_torch_shares_memory(name):
    _require_cuda_in_both()
    with _dtype_context(name):
        a = jax.device_put(jnp.asarray(_values(name)), jax.devices("gpu")[0])
        t = bridges.to_torch(a)
        assert t.device.type == "cuda" and t.dtype == DTYPES[name][1]
        assert t.data_ptr() == a.unsafe_buffer_pointer()
        t[1] = _written(name)
        torch.cuda.synchronize()
        assert a[1] == _written(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", DTYPES)
def test_cuda_to_jax_shares_memory(name):
    _require_cuda_in_both()
    with _dtype_context(name):
        t = torch.from_numpy(np.asarray(_values(name).astype(np.float32))).to("cuda", DTYPES[name][1])
        a = bridges.to_jax(t)
        assert a.devices() == {jax.devices("gpu")[0]} and a.dtype == DTYPES[name][0]
        assert a.unsafe_buffer_pointer() == t.data_ptr()


# --- torch training through the swarm ----------------------------------------------------------------


def test_torch_training_through_faulty_swarm_matches_jax(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 2), (2, 4), (0, 4)])
    a, b, c = swarm.servers
    x0, p0 = random_inputs(tiny_cfg, 2, 6, 3)
    target = jnp.sin(jnp.arange(tiny_cfg.hidden_size, dtype=jnp.float32)) * jnp.ones(x0.shape)

    def loss_ref(x, p):
        return jnp.mean((jaxseq.local_sequential(tiny_cfg, tiny_params, x, p) - target) ** 2)

    reference = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1)))
    blocks = bridges.RemoteSequential(manager)
    x = bridges.to_torch(x0, copy=True).requires_grad_()
    prompts = torch.nn.Parameter(bridges.to_torch(p0, copy=True))
    optimizer = torch.optim.AdamW([prompts], lr=0.02)
    faults = {0: (c, "forward"), 2: (b, "backward")}
    losses = []
    for step in range(5):
        if step in faults:
            server, stage = faults[step]
            server.fail_next(1, stage)
        optimizer.zero_grad()
        x.grad = None
        loss = torch.mean((blocks(x, prompts) - bridges.to_torch(target)) ** 2)
        loss.backward()
        want_loss, (want_gx, want_gp) = reference(bridges.to_jax(x.detach()), bridges.to_jax(prompts.detach()))
        assert rel_err(loss.item(), want_loss) < TOL
        assert rel_err(x.grad, want_gx) < TOL
        assert rel_err(prompts.grad, want_gp) < TOL
        losses.append(loss.item())
        optimizer.step()
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.9 * losses[0]
    # step 0: c's forward fails, c is banned, a and b run every step from then on;
    # step 2: b's backward fails, blocks 2:4 are re-run on c (forward and backward), b is banned,
    # and c serves 2:4 for the last two steps.
    assert a.calls == {"forward": 5, "backward": 5, "inference": 0}
    assert b.calls == {"forward": 3, "backward": 3, "inference": 0}
    assert c.calls == {"forward": 4, "backward": 3, "inference": 0}
    assert manager.retries == 2
    assert len(manager.saved) == 0  # every forward's state was used by its backward


def test_remote_sequential_module_details(tiny_cfg, tiny_params, make_swarm):
    swarm, manager = make_swarm([(0, 4)])
    blocks = bridges.RemoteSequential(manager)
    x0, _ = random_inputs(tiny_cfg, 2, 5, 0)
    x = bridges.to_torch(x0, copy=True)
    with torch.no_grad():
        out = blocks(x)
    assert len(manager.saved) == 0  # nothing kept when no gradient can be asked for
    assert out.dtype == x.dtype and out.device == x.device and not out.requires_grad
    assert rel_err(out, jaxseq.local_sequential(tiny_cfg, tiny_params, x0)) < TOL
    # Without prompts, gradients still reach x; a second backward (retain_graph) recomputes the forward.
    x.requires_grad_()
    out = blocks(x)
    (g1,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), x)
    g_ref = jax.grad(lambda x: jnp.sum(jaxseq.local_sequential(tiny_cfg, tiny_params, x)))(x0)
    assert rel_err(g1, g_ref) < TOL and rel_err(g2, g_ref) < TOL
    assert swarm.servers[0].calls == {"forward": 3, "backward": 2, "inference": 0}


@pytest.mark.parametrize(
    "x_shape,prompts_shape,dtype,error,message",
    [
        ((5, 32), None, torch.float32, ValueError, r"x must be \[batch, seq, hidden\]"),
        ((1, 5, 32), None, torch.int64, ValueError, "x must have a floating dtype, got int64"),
        ((1, 5, 16), None, torch.float32, ValueError, "hidden size 16"),
        ((1, 5, 32), (3, 1, 2, 32), torch.float32, ValueError, r"prompts must be \[n_blocks=4"),
        ((1, 5, 32), (4, 1, 6, 32), torch.float32, ValueError, "prompt length 6 exceeds the sequence length 5"),
    ],
)
def test_remote_sequential_rejects_bad_input(make_swarm, x_shape, prompts_shape, dtype, error, message):
    swarm, manager = make_swarm([(0, 4)])
    x = torch.zeros(x_shape, dtype=dtype)
    prompts = None if prompts_shape is None else torch.zeros(prompts_shape)
    with pytest.raises(error, match=message):
        bridges.RemoteSequential(manager)(x, prompts)
    with pytest.raises(
        TypeError, match="x must be a torch.Tensor, got ArrayImpl; for JAX arrays use jaxseq.remote_sequential"
    ):
        bridges.RemoteSequential(manager)(jnp.zeros((1, 5, 32)))
    assert swarm.servers[0].calls == {"forward": 0, "backward": 0, "inference": 0}


# --- torch in JAX, JAX in torch ------------------------------------------------------------------------


def _mlp(d_in: int, d_out: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, d_out))


def _mlp_in_jax(mlp: torch.nn.Sequential):
    """The same MLP written in JAX, from the torch weights: the reference for gradients through JAX."""
    w1, b1, w2, b2 = (bridges.to_jax(p.detach()) for p in mlp.parameters())
    return lambda x: jnp.tanh(x @ w1.T + b1) @ w2.T + b2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_module_as_jax_matches_torch_autograd(device):
    if device == "cuda":
        _require_cuda_in_both()
    mlp = _mlp(8, 32, seed=0).to(device)  # JAX's arrays stay on JAX's default device: inputs move to the module
    f = bridges.torch_module_as_jax(mlp)
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    weights = jnp.cos(jnp.arange(32.0))

    x_t = bridges.to_torch(x, copy=True).to(device).requires_grad_()
    out_t = mlp(x_t)
    (grad_t,) = torch.autograd.grad((out_t * bridges.to_torch(weights).to(device)).sum(), x_t)

    def loss(x):
        return jnp.sum(f(x) * weights)

    for run in (lambda g: g, jax.jit):
        assert rel_err(run(f)(x), out_t.detach()) < TOL
        assert rel_err(run(jax.grad(loss))(x), grad_t) < TOL
    assert all(p.grad is None for p in mlp.parameters())  # parameters are constants to JAX
    # vmap calls the module once per example
    assert rel_err(jax.vmap(f)(x), out_t.detach()) < TOL
    # an explicit out_shape skips the shape-finding call
    explicit = bridges.torch_module_as_jax(mlp, out_shape=lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (32,), s.dtype))
    assert rel_err(jax.jit(explicit)(x), out_t.detach()) < TOL


def test_torch_modules_around_remote_sequential_in_one_grad(tiny_cfg, tiny_params, make_swarm):
    """A torch embedding and a torch head around the swarm's blocks, differentiated by one jax.grad."""
    _, manager = make_swarm([(0, 2), (2, 4)])
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(11, tiny_cfg.hidden_size)
    head = _mlp(tiny_cfg.hidden_size, 4, seed=1)
    embed_jax, head_jax = bridges.torch_module_as_jax(embedding), bridges.torch_module_as_jax(head)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 11
    shift, prompts = random_inputs(tiny_cfg, 2, 6, 2)

    def loss(shift, prompts):
        h = embed_jax(ids) + shift
        return jnp.sum(jnp.sin(head_jax(jaxseq.remote_sequential(h, prompts, manager))))

    table, head_ref = bridges.to_jax(embedding.weight.detach()), _mlp_in_jax(head)

    def loss_ref(shift, prompts):
        h = table[ids] + shift
        return jnp.sum(jnp.sin(head_ref(jaxseq.local_sequential(tiny_cfg, tiny_params, h, prompts))))

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(shift, prompts)
    want = jax.value_and_grad(loss_ref, argnums=(0, 1))(shift, prompts)
    assert rel_err(got[0], want[0]) < TOL
    assert rel_err(got[1][0], want[1][0]) < TOL and rel_err(got[1][1], want[1][1]) < TOL


def test_jax_function_as_torch_matches_jax():
    def fn(x, w, scale):
        h = jnp.tanh(x @ w) * scale
        return {"h": h, "norm": jnp.sum(x**2), "argmax": jnp.argmax(h, axis=-1)}

    f = bridges.jax_function_as_torch(fn)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    w = jax.random.normal(jax.random.key(2), (6, 3))
    scale = jnp.arange(1, 4, dtype=jnp.int32)
    weights = jnp.cos(jnp.arange(12.0)).reshape(4, 3)

    x_t = bridges.to_torch(x, copy=True).requires_grad_()
    w_t = bridges.to_torch(w, copy=True).requires_grad_()
    out = f(x_t, w_t, bridges.to_torch(scale))
    ref = fn(x, w, scale)
    assert rel_err(out["h"].detach(), ref["h"]) < TOL and rel_err(out["norm"].detach(), ref["norm"]) < TOL
    assert torch.equal(out["argmax"], bridges.to_torch(ref["argmax"])) and not out["argmax"].requires_grad
    (out["h"] * bridges.to_torch(weights)).sum().add(out["norm"]).backward()

    def loss(x, w):
        r = fn(x, w, scale)
        return jnp.sum(r["h"] * weights) + r["norm"]

    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert rel_err(x_t.grad, gx) < TOL and rel_err(w_t.grad, gw) < TOL
