"""Petals' DHT records through a hivemind ``DHT``: servers announce theirs, clients read them. The
functions given to ``DHT.run_coroutine`` run inside the DHT's own process, so they are plain
module-level coroutines."""

from __future__ import annotations

import functools
import gc
import math
import warnings
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from jaxseq.remote.protocol import block_uid
from jaxseq.remote.records import ServerInfo, ServerRecord, parse_block_records

MODELS_KEY = "_petals.models"  # subkey: a model's dht_prefix; value: {"num_blocks", "repository"}


def start_dht(**kwargs: Any) -> hivemind.DHT:
    """Start a hivemind DHT (a forked process running p2pd). The fork happens after JAX has started its
    threads, which Python warns about; the child only runs hivemind's asyncio DHT and never touches
    JAX, so that warning does not apply and is silenced here alone.

    The child must not finalize objects it inherited either: garbage the parent had not collected yet
    (JAX or torch buffers on a GPU, say) would be freed through a runtime whose threads the fork did
    not copy, and on a GPU that aborted the child. Freezing the collector across the fork keeps every
    inherited object out of the child's collections."""
    gc.freeze()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            return hivemind.DHT(start=True, **kwargs)
    finally:
        gc.unfreeze()


async def _store_many(dht, node, keys: list, subkey: str, value: Any, expiration: float) -> None:
    await node.store_many(keys, [value] * len(keys), expiration_time=expiration, subkeys=[subkey] * len(keys))


async def _get_many(dht, node, keys: list) -> dict:
    found = await node.get_many(keys, sufficient_expiration_time=math.inf)
    result = {}
    for key in keys:
        entry = found.get(key)
        if entry is not None and isinstance(entry.value, dict):
            result[key] = {subkey: item.value for subkey, item in entry.value.items()}
    return result


async def announce(
    dht: hivemind.DHT, dht_prefix: str, start: int, end: int, info: ServerInfo, num_blocks: int, expiration: float
) -> None:
    """Store the server's ``info`` under each served block, and the model's size under ``_petals.models``."""
    peer = dht.peer_id.to_base58()
    expires = get_dht_time() + expiration
    keys = [block_uid(dht_prefix, i) for i in range(start, end)]
    value = info.to_tuple()
    await dht.run_coroutine(
        functools.partial(_store_many, keys=keys, subkey=peer, value=value, expiration=expires), return_future=True
    )
    if not dht_prefix.startswith("_"):  # as in Petals, a prefix starting with "_" is a private model
        model_info = {"num_blocks": num_blocks, "repository": None}
        await dht.run_coroutine(
            functools.partial(_store_many, keys=[MODELS_KEY], subkey=dht_prefix, value=model_info, expiration=expires),
            return_future=True,
        )


async def fetch_servers(dht: hivemind.DHT, dht_prefix: str, num_blocks: int) -> list[ServerRecord]:
    """Every server that announces blocks of ``dht_prefix``, one record per contiguous span."""
    keys = [block_uid(dht_prefix, i) for i in range(num_blocks)]
    found = await dht.run_coroutine(functools.partial(_get_many, keys=keys), return_future=True)
    return parse_block_records({i: found.get(key) for i, key in enumerate(keys)})


async def fetch_num_blocks(dht: hivemind.DHT, dht_prefix: str) -> int | None:
    """The model's ``num_blocks`` as announced under ``_petals.models``, or None when nobody announced it."""
    found = await dht.run_coroutine(functools.partial(_get_many, keys=[MODELS_KEY]), return_future=True)
    info = found.get(MODELS_KEY, {}).get(dht_prefix)
    if isinstance(info, dict) and isinstance(info.get("num_blocks"), int) and info["num_blocks"] > 0:
        return info["num_blocks"]
    return None
