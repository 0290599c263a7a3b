"""The credential actor: a task per credential that owns its state's timers, logs and persistence.

State transitions themselves are synchronous (``routerd.core`` applies them in the same
event-loop step as the plan), so no plan ever sees a stale credential. What takes time
happens here, fed through a bounded mailbox of the core's events: logging each change,
marking the state file dirty at once for a park or a disable, and, when a cooldown runs
out, logging it and waking the requests that wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio
import structlog
from anyio.abc import TaskStatus

from routerd.config.secrets import Secret
from routerd.core.credential import CredentialState, Health
from routerd.core.routing import (
    CredentialCooled,
    CredentialDisabled,
    CredentialEvent,
    CredentialParked,
    CredentialReady,
    WindowLearned,
    expire,
)

log = structlog.get_logger("routerd.credential")


class CredentialActor:
    """One credential: its secret (never logged), its state, and the task that watches it."""

    def __init__(
        self,
        state: CredentialState,
        secret: Secret,
        *,
        mailbox_size: int,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        on_lasting: Callable[[], None] = lambda: None,
    ) -> None:
        self.state = state
        self.secret = secret
        self.dropped = 0
        self._on_change = on_change
        # A park or a disable must reach the state file at once, not at the next flush: a
        # crash right after would otherwise re-hit the key on restart.
        self._on_lasting = on_lasting
        self._clock = clock
        self._send, self._receive = anyio.create_memory_object_stream[CredentialEvent](mailbox_size)

    @property
    def mailbox_depth(self) -> int:
        """Events waiting in the mailbox, for ``routerd status``."""
        return self._send.statistics().current_buffer_used

    def report(self, event: CredentialEvent) -> None:
        """Take an event the core returned for this credential, to log it.

        Never blocks the request path: a full mailbox sheds the event (its only loss is one
        log line; the state itself is already updated) and counts it.
        """
        if isinstance(event, CredentialParked | CredentialDisabled):
            # Called from the request path, so also when the mailbox is full.
            self._on_lasting()
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # The actor stopped (a reload removed its credential) while a request still used
            # it: the state is updated, only the log line is lost.
            self.dropped += 1

    def close(self) -> None:
        """Close the mailbox of an actor that will not run (or no longer runs)."""
        self._send.close()
        self._receive.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Log the mailbox until cancelled; wake waiters when a cooldown or a park runs out.

        The events' own changes woke the waiters already (the dispatcher does, once per
        settle): logging them wakes no one.
        """
        task_status.started()
        async with self._receive, self._send:
            while True:
                wait = self._until_next_transition()
                with anyio.move_on_after(wait):
                    self._log(await self._receive.receive())
                    continue
                for event in expire(self.state, self._clock()):
                    self._log(event)
                self._on_change()

    def _until_next_transition(self) -> float:
        state = self.state
        now = self._clock()
        if state.health in (Health.COOLING, Health.PARKED) and state.until > now:
            return state.until - now
        if state.health is Health.DISABLED and state.until > now:
            return state.until - now
        return math.inf

    def _log(self, event: CredentialEvent) -> None:
        state = self.state
        now = self._clock()
        fields = {
            "provider": state.provider,
            "credential": state.label,
            "fingerprint": state.fingerprint,
        }
        if isinstance(event, CredentialCooled):
            cooldown_s = round(event.until - now, 3)
            log.info("credential_cooled", cooldown_s=cooldown_s, reason=event.reason, **fields)
        elif isinstance(event, CredentialParked):
            parked_s = round(event.until - now, 1)
            log.warning("credential_parked", parked_s=parked_s, reason=event.reason, **fields)
        elif isinstance(event, CredentialDisabled):
            probe_in_s = round(event.until - now, 1)
            log.warning("credential_disabled", probe_in_s=probe_in_s, reason=event.reason, **fields)
        elif isinstance(event, CredentialReady):
            log.info("credential_ready", was=event.was.value, **fields)
        elif isinstance(event, WindowLearned):
            log.debug("credential_window", window=event.window, limit=event.limit, **fields)
