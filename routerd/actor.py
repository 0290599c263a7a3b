"""The credential actor: a task per credential that owns its state's timers, logs and persistence.

State transitions themselves are synchronous (``CredentialState`` methods called by the
dispatcher in the same event-loop step as the plan), so no plan ever sees a stale credential.
What takes time happens here, fed through a bounded mailbox: logging each state change,
waking requests that wait when a cooldown runs out, and marking the state file dirty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import TaskStatus

from routerd.credential import CredentialState, Health
from routerd.secrets import Secret

log = structlog.get_logger("routerd.credential")


@dataclass(frozen=True, slots=True)
class Changed:
    """A credential's health changed; ``reason`` says why (never a secret)."""

    before: Health
    after: Health
    reason: str
    until: float


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
        self._send, self._receive = anyio.create_memory_object_stream[Changed](mailbox_size)

    @property
    def mailbox_depth(self) -> int:
        """Events waiting in the mailbox, for ``routerd status``."""
        return self._send.statistics().current_buffer_used

    def report(self, before: Health, reason: str = "") -> None:
        """Tell the actor that the dispatcher just changed the state (if it did).

        Never blocks the request path: a full mailbox sheds the event (its only loss is one
        log line; the state itself is already updated) and counts it.
        """
        state = self.state
        after = state.current_health(self._clock())
        if after is before and not reason:
            return
        if after in (Health.PARKED, Health.DISABLED) and after is not before:
            # Called from the request path, so also when the mailbox is full.
            self._on_lasting()
        try:
            self._send.send_nowait(Changed(before, after, reason or state.reason, state.until))
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
        """Serve the mailbox until cancelled; wake when a cooldown or a park runs out."""
        task_status.started()
        async with self._receive, self._send:
            while True:
                wait = self._until_next_transition()
                with anyio.move_on_after(wait):
                    event = await self._receive.receive()
                    self._log(event)
                    self._on_change()
                    continue
                self._expire()

    def _until_next_transition(self) -> float:
        state = self.state
        now = self._clock()
        if state.health in (Health.COOLING, Health.PARKED) and state.until > now:
            return state.until - now
        if state.health is Health.DISABLED and state.until > now:
            return state.until - now
        return math.inf

    def _expire(self) -> None:
        state = self.state
        if state.health in (Health.COOLING, Health.PARKED):
            before = state.health
            state.health = Health.READY
            state.reason = ""
            log.info(
                "credential_ready",
                provider=state.provider,
                credential=state.label,
                fingerprint=state.fingerprint,
                was=before.value,
            )
        self._on_change()

    def _log(self, event: Changed) -> None:
        state = self.state
        now = self._clock()
        fields = {
            "provider": state.provider,
            "credential": state.label,
            "fingerprint": state.fingerprint,
            "reason": event.reason,
        }
        if event.after is Health.COOLING:
            log.info("credential_cooled", cooldown_s=round(event.until - now, 3), **fields)
        elif event.after is Health.PARKED:
            log.warning("credential_parked", parked_s=round(event.until - now, 1), **fields)
        elif event.after is Health.DISABLED:
            log.warning("credential_disabled", probe_in_s=round(event.until - now, 1), **fields)
        elif event.before is not Health.READY:
            log.info("credential_ready", was=event.before.value, **fields)
        else:
            log.info("credential_changed", **fields)
