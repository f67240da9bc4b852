"""Failures at one position of a chain of calls, bounded by ``ClientConfig.max_retries`` and the call's
deadline: each failure bans the server at fault and backs off (logged), and running out gives the
typed error of the last failure."""

from __future__ import annotations

import dataclasses
import logging
import time

from jaxseq.client.errors import MissingBlocksError, RemoteCallError, ServerFailure, SwarmError
from jaxseq.client.manager import SequenceManager

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Retries:
    """Failures at one position of the chain, bounded by ``max_retries`` and the call's deadline."""

    manager: SequenceManager
    deadline: float
    what: str
    attempts: int = 0
    last_error: Exception | None = None
    last_block: int = 0

    def timeout(self) -> float:
        """Time left for the next call; gives up (with the last failure's typed error) when none is left."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._give_up(
                f"deadline of {self.manager.config.deadline:.1f} s passed after {self.attempts} failed attempts"
            )
        return min(self.manager.config.request_timeout, remaining)

    async def failed(self, error: Exception, block: int) -> None:
        """Record a failure; raise the typed error when retries or time are used up, else back off."""
        self.attempts += 1
        self.last_error, self.last_block = error, block
        if isinstance(error, ServerFailure):
            self.manager.ban(error.peer, f"{self.what} failed: {error}")
        max_retries = self.manager.config.max_retries
        if self.attempts > max_retries:
            raise self._give_up(f"{self.attempts} failed attempts (max_retries={max_retries})")
        self.timeout()
        logger.warning(
            "%s failed at block %d (attempt %d of %d): %s; retrying in %.2f s",
            self.what,
            block,
            self.attempts,
            max_retries + 1,
            error,
            self.manager.config.backoff(self.attempts),
        )
        await self.manager.wait_before_retry(self.attempts, self.deadline)

    def _give_up(self, why: str) -> SwarmError:
        error = self.last_error
        if isinstance(error, MissingBlocksError):
            return MissingBlocksError(error.block, why)
        if isinstance(error, ServerFailure) and not error.reachable:
            return MissingBlocksError(self.last_block, f"{why}; last: {error}")
        return RemoteCallError(f"{self.what}: {why}" + (f"; last error: {error}" if error else ""))

    def succeeded(self) -> None:
        self.attempts = 0
        self.last_error = None
