"""The server's hand-offs (``jaxseq.server.handoffs``): bounded whatever peers send, and no request waits past its
timeout. (The hops themselves, through real servers and links: ``test_real_network.py``.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from jaxseq.remote.protocol import ProtocolError
from jaxseq.server.handoffs import Handoffs, check_id

KIB = np.zeros(256, np.float32)  # 1 KiB


def test_a_hand_off_arriving_first_waits_for_its_request_within_the_byte_budget_oldest_first():
    async def run():
        handoffs = Handoffs(max_bytes=3 * KIB.nbytes, ttl=60.0)
        assert all(handoffs.put(f"h{i}", KIB + i) for i in range(5))
        assert len(handoffs) == 3 and handoffs.nbytes == 3 * KIB.nbytes and handoffs.dropped == 2
        np.testing.assert_array_equal(await handoffs.take("h4", timeout=1.0), KIB + 4)
        with pytest.raises(TimeoutError, match="h0"):  # evicted: its request waits out its timeout, no more
            await handoffs.take("h0", timeout=0.05)
        assert not handoffs.put("big", np.zeros(4 * 256, np.float32))  # larger than the whole budget
        assert not handoffs.put("h3", KIB)  # sent twice: the first stays
        np.testing.assert_array_equal(await handoffs.take("h3", timeout=1.0), KIB + 3)
        return handoffs

    handoffs = asyncio.run(run())
    assert len(handoffs) == 1 and handoffs.nbytes == KIB.nbytes and handoffs.dropped == 4


def test_a_waiting_request_gets_its_hand_off_at_once_and_an_unclaimed_one_expires():
    async def run():
        handoffs = Handoffs(max_bytes=KIB.nbytes, ttl=0.05)
        taking = asyncio.ensure_future(handoffs.take("h", timeout=5.0))
        await asyncio.sleep(0.01)
        with pytest.raises(ProtocolError, match="already awaits"):
            await handoffs.take("h", timeout=1.0)
        start = time.monotonic()
        # a tensor for a waiting request is not kept, so the budget does not apply to it
        assert handoffs.put("h", np.ones(1024, np.float32))
        assert (await taking).shape == (1024,) and time.monotonic() - start < 0.5
        handoffs.put("late", KIB)
        await asyncio.sleep(0.1)
        handoffs.put("other", KIB)  # expires what waited past ttl
        with pytest.raises(TimeoutError):
            await handoffs.take("late", timeout=0.01)
        return handoffs

    handoffs = asyncio.run(run())
    assert len(handoffs) == 1 and handoffs.dropped == 1


@pytest.mark.parametrize("bad", [None, 5, "", "x" * 129, ["id"]])
def test_hand_off_ids_are_checked(bad):
    with pytest.raises(ProtocolError, match="hand-off id"):
        check_id(bad)
