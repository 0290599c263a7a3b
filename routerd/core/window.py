"""A provider's rate-limit window as one credential learns it: what is left, when more frees.

Pure and synchronous: time comes in as ``now`` (monotonic seconds).
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import insort
from dataclasses import dataclass, field

from routerd.core.outcome import Window

# After a window's reset passed, the new window's reset is unknown until the next reply
# reports it; this guess only matters when replies carry no rate-limit headers.
ROLLOVER_S = 60.0
# Shares awaiting their return, at most; a share past this is never credited back, so a
# busier window only falls back to waiting for its reset.
FREES_MAX = 4096


@dataclass(slots=True)
class LearnedWindow:
    """A provider-reported window and a safe estimate of what is left in it now.

    ``remaining`` is a lower bound: a reply's figure less everything the provider may not
    have counted when it wrote it. What had been answered before that request was sent is
    surely counted; anything else we sent may not be, in whatever order the provider
    handled it. Each reply gives such a bound, each request we send lowers it, and the
    larger of two bounds is still one. Once the reset passed, the window is whole again;
    its next reset is a guess (``ROLLOVER_S``) until a reply reports it.

    A sliding window frees each request's share a window length after the provider
    counted it, not all at once at the reset (which is when the newest share leaves). A
    reply that counted our request says when the window is whole again (its reset, from
    when we read it), which is no earlier than our own share leaves: that share is
    credited back then (``frees``), one by one. A reply's figure may already show a share
    freed that we credit later; so it only raises the estimate by what it adds beyond the
    shares that may have left by then: those sent at least a window ago, the window being
    at least as long as any reset reported less the unit it was written in (Anthropic
    writes whole seconds, rounded up: a reset of 2.9 s is one of a 2 s window). A reply read
    after the reset, to a request sent before it, counted shares that have left since: it
    lowers the estimate no further than the whole window less what is still unanswered.
    """

    limit: int | None = None
    remaining: int | None = None
    reset_at: float = 0.0
    guessed: bool = True
    sent: int = 0
    answered: int = 0
    # The longest reset a reply reported (the fleet's ledger keeps shares this long).
    longest_reset: float = 0.0
    # The window is surely at least this long: a reported reset less its rounding.
    shortest_length: float = 0.0
    # (when it is back, when it was sent, amount, id), in order: answered shares to credit.
    frees: list[tuple[float, float, int, int]] = field(default_factory=list)
    # The same shares by when they were sent, for the ones the provider may have freed
    # already (sent at least a window ago): ``matured`` sums those, by id in ``_matured``;
    # a share credited before it matured waits in ``_gone`` until the heap pops it. Kept
    # as it goes, so a reply costs O(log n) however many shares wait.
    _by_sent: list[tuple[float, int, int]] = field(default_factory=list, repr=False)
    _matured: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)
    _gone: set[int] = field(default_factory=set, repr=False)
    matured: int = 0
    # Hosts spending this window together (``core/shared.py``): past its share of the
    # window, each takes a place in the fleet's ledger before it sends.
    hosts: int = 1
    _ids: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def learn(
        self,
        window: Window | None,
        now: float,
        answered_at_send: int,
        amount: int,
        sent_at: float | None = None,
    ) -> None:
        """Take the report of a reply to a request of ``amount`` sent at ``sent_at``.

        ``answered_at_send`` is what had been answered when that request was sent;
        ``sent_at`` is None unless the provider counted the request (it did not refuse it).
        """
        if window is None:
            return
        self._roll(now)
        if window.limit is not None:
            self.limit = window.limit
        if window.remaining is not None:
            unreported = max(0, self.sent - answered_at_send - amount)
            bound = max(0, window.remaining - unreported)
            if self.remaining is None or now >= self.reset_at:
                self.remaining = bound
                if sent_at is not None and sent_at < self.reset_at and self.limit is not None:
                    # Counted before the window was whole again, beside shares that have
                    # left since: now the window holds at most what is still unanswered.
                    whole = self.limit - max(0, self.sent - self.answered)
                    self.remaining = max(bound, whole)
            else:
                self.remaining = max(self.remaining, bound - self._maybe_freed(now))
        if window.reset_s is not None:
            reset_at = now + window.reset_s
            if self.guessed or now >= self.reset_at:
                self.reset_at = reset_at
            else:
                self.reset_at = max(self.reset_at, reset_at)
            self.guessed = False
            if sent_at is not None and window.remaining is not None:
                self.longest_reset = max(self.longest_reset, window.reset_s)
                if window.reset_s - window.reset_step_s > self.shortest_length:
                    self._window_grew(window.reset_s - window.reset_step_s)
                if amount and len(self.frees) < FREES_MAX:
                    share = next(self._ids)
                    insort(self.frees, (reset_at, sent_at, amount, share))
                    heapq.heappush(self._by_sent, (sent_at, share, amount))

    def _window_grew(self, length: float) -> None:
        """A longer window: the shares counted as sent a window ago are looked at again."""
        self.shortest_length = length
        for share, (sent_at, amount) in self._matured.items():
            heapq.heappush(self._by_sent, (sent_at, share, amount))
        self._matured.clear()
        self.matured = 0

    def _maybe_freed(self, now: float) -> int:
        """What of the shares still to credit the provider may have freed by ``now``."""
        shortest = self.shortest_length
        by_sent = self._by_sent
        while by_sent and by_sent[0][0] + shortest <= now:
            sent_at, share, amount = heapq.heappop(by_sent)
            if share in self._gone:
                self._gone.discard(share)
            else:
                self._matured[share] = (sent_at, amount)
                self.matured += amount
        return self.matured

    def _forget(self, share: int, amount: int) -> None:
        """A share is credited back (or dropped): it no longer counts as maybe freed."""
        if self._matured.pop(share, None) is not None:
            self.matured -= amount
        else:
            self._gone.add(share)

    def _roll(self, now: float) -> None:
        """Fold into ``remaining`` the shares that are back by ``now``."""
        back = 0
        while back < len(self.frees) and self.frees[back][0] <= now:
            back += 1
        freed = 0
        for _, _, amount, share in self.frees[:back]:
            freed += amount
            self._forget(share, amount)
        del self.frees[:back]
        if freed and self.remaining is not None:
            self.remaining += freed
            if self.limit is not None:
                self.remaining = min(self.remaining, self.limit)

    @property
    def guarded(self) -> bool:
        """Whether the fleet's ledger, not this estimate, says when a request fits: other
        hosts spend the window too (whose requests this host hears of late) and a reply
        told its limit and length. ``needs_place`` in ``core/shared.py`` asks the same."""
        return self.hosts >= 2 and self.limit is not None and self.longest_reset > 0

    def left(self, now: float) -> int | None:
        """What is left now; once the reset passed, the whole limit (None when unknown)."""
        if self.remaining is None:
            return None
        if now >= self.reset_at:
            return self.limit if self.limit is not None else None
        left = self.remaining
        for at, _, amount, _ in self.frees:
            if at > now:
                break
            left += amount
        return min(left, self.limit) if self.limit is not None else left

    def free_at(self, amount: int, now: float) -> float:
        """When ``amount`` fits (``now`` if it does or nothing is known): as answered shares
        come back, else at the reset."""
        left = self.left(now)
        if left is None or left >= amount or now >= self.reset_at:
            return now
        need = amount - left
        for at, _, spent, _ in self.frees:
            if at <= now:
                continue
            need -= spent
            if need <= 0:
                return min(self.reset_at, at)
        return self.reset_at

    def next_change(self, now: float) -> float:
        """When what is left next grows (a share back, or the reset); inf: never."""
        at = self.reset_at if now < self.reset_at else math.inf
        for back, _, _, _ in self.frees:
            if back > now:
                return min(at, back)
        return at

    def spend(self, amount: int, now: float) -> int:
        """Count a request we send; returns what had been answered so far (its mark)."""
        self._roll(now)
        if self.remaining is not None:
            if now >= self.reset_at and self.limit is not None:
                # Whole again but for what is still unanswered: those were sent after the
                # last reply dated the reset, so the provider's window holds them still.
                self.remaining = max(0, self.limit - max(0, self.sent - self.answered))
                self.reset_at = now + ROLLOVER_S
                self.guessed = True
            self.remaining = max(0, self.remaining - amount)
        self.sent += amount
        return self.answered

    def unspend(self, amount: int) -> None:
        """A request counted by ``spend`` was never sent."""
        self.sent = max(0, self.sent - amount)
        if self.remaining is not None:
            self.remaining += amount
            if self.limit is not None:
                self.remaining = min(self.remaining, self.limit)

    def answer(self, amount: int) -> None:
        """A request we sent was answered (or given up on)."""
        self.answered += amount

    def refused(self, until: float) -> None:
        """The provider said the window is full: nothing is left until ``until`` at least.

        The shares awaiting their return are forgotten: the provider counts something we
        did not, so only the reset is trusted until new replies date shares again.
        """
        if self.remaining is not None:
            self.remaining = 0
            self.reset_at = max(self.reset_at, until)
        self.frees.clear()
        self._by_sent.clear()
        self._matured.clear()
        self._gone.clear()
        self.matured = 0

    def merge(
        self,
        limit: int | None,
        remaining: int,
        reset_at: float,
        now: float,
        *,
        newer_wins: bool = False,
    ) -> bool:
        """Take another host's figure of the same provider window: what is left is
        ``remaining`` until ``reset_at``. A running estimate here is kept, its reset moved
        later to the other's; unless ``newer_wins`` (a ledger of the fleet's requests
        guards the window) and the other's figure comes from a later reply. Returns
        whether anything changed."""
        if self.limit is None and limit is not None:
            self.limit = limit
        running = self.remaining is not None and now < self.reset_at
        if running and not (newer_wins and reset_at > self.reset_at):
            changed = reset_at > self.reset_at
            self.reset_at = max(self.reset_at, reset_at)
            return changed
        self._roll(now)
        self.remaining = remaining
        self.reset_at = max(self.reset_at, reset_at) if now < self.reset_at else reset_at
        self.guessed = False
        return True
