"""What the dispatcher tells the hosts it shares keys with, and asks them, around an attempt."""

from __future__ import annotations

from typing import Protocol

from routerd.core import routing as core
from routerd.core.plan import Candidate


class Sharing(Protocol):
    """The shared state's hooks on the attempt path (``routerd.fleet.FleetLink``).

    ``begun`` runs once the core leased the candidate's key and returns False when
    another host tries that unproven key first (the attempt is then cancelled and the
    request planned again); it must not wait on anything but such a first try.
    ``settled`` runs after the core settled the attempt, with what the core did.
    """

    async def begun(self, candidate: Candidate, ticket: core.AttemptTicket) -> bool:
        """The attempt holds its lease: may it go out?"""

    def settled(
        self, candidate: Candidate, ticket: core.AttemptTicket, events: list[core.Event]
    ) -> None:
        """The attempt settled with ``events``."""
