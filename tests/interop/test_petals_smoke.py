"""A real Petals 2.2 server and client on 127.0.0.1 agree with the local HF model.

This checks the interop harness itself (venv, checkpoint writer, server lifecycle, client), so
that the jaxseq-vs-Petals interop tests can trust it. Skipped when the Petals venv cannot be
built because the package index is unreachable.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from petals_helpers import petals_client_fwd_bwd, petals_server, write_tiny_checkpoint_with_petals_venv

pytestmark = [pytest.mark.petals, pytest.mark.network]


def _petals_p2pd_pids(petals_py: str) -> set[int]:
    """p2pd daemons run from the Petals venv (jaxseq's own p2pd, from its venv, may run alongside)."""
    venv = str(Path(petals_py).parent.parent)
    out = subprocess.run(["pgrep", "-a", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.split()[1].startswith(venv)}


def test_petals_server_and_client_match_local_hf(petals_py, tmp_path):
    ckpt = write_tiny_checkpoint_with_petals_venv(  # init_std big enough that every block changes its input a lot
        petals_py, tmp_path / "ckpt",
        hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=100, init_std=0.2,
    )  # fmt: skip
    p2pd_before = _petals_p2pd_pids(petals_py)
    with petals_server(petals_py, ckpt, block_indices="0:4", dht_prefix="smoke", log_dir=tmp_path) as server:
        assert server.maddr == f"/ip4/127.0.0.1/tcp/{server.port}/p2p/{server.peer_id}"
        assert server.process.poll() is None
        result = petals_client_fwd_bwd(petals_py, ckpt, [server.maddr], dht_prefix="smoke", batch=2, seq=8)
        log = server.log_tail(400)
        pgid = server.process.pid

    assert "rpc_forward(blocks=0:4" in log and "rpc_backward(blocks=0:4" in log, log
    assert result["first_block_change"] > 0.5, result
    # float32 on CPU, same kernels on both sides: seen exactly 0; allow for other BLAS builds.
    for key in ("rel_logits", "rel_grad_inputs_embeds", "rel_grad_lm_head", "rel_grad_norm"):
        assert result[key] < 1e-4, (key, result)

    # Teardown stopped the whole process group, p2pd daemons included.
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not (_petals_p2pd_pids(petals_py) - p2pd_before), "p2pd left behind by the Petals server"
