"""Whether a stored copy answers a request: the freshness decision, as a pure function.

No I/O and no clock of its own: the caller gives the stored copy's times, the time now
and what the client asked, and acts on the :class:`Action` returned (RFC 9111's
freshness, plus stale-while-revalidate and the client's ``max-age=0``).
"""

from __future__ import annotations

from enum import Enum


class Action(Enum):
    """What to do with a stored copy."""

    #: The stored copy answers; upstream is not asked.
    SERVE = "serve"
    #: The stored copy answers at once; one revalidation runs behind it.
    SERVE_STALE = "serve-stale"
    #: Upstream must be asked before this client is answered.
    ASK = "ask"


def check_due(fetched: float, now: float, wants_check: bool, revalidate_window: float) -> bool:
    """Whether a client's demand for a check (``max-age=0``) must be honoured.

    A copy fetched less than ``revalidate_window`` seconds ago was just checked: a
    burst of such clients (apt asks it for every index) is not a burst upstream.
    """
    return wants_check and now - fetched >= revalidate_window


def decide(
    *,
    immutable: bool,
    expires: float | None,
    fetched: float,
    now: float,
    wants_check: bool,
    revalidate_window: float,
    stale_grace: float,
) -> Action:
    """How a stored copy answers.

    :param immutable: the content never changes, or an index pins it (digests, size).
    :param expires: when the stored copy stops being fresh; ``None``: not known.
    :param fetched: when it was last fetched or confirmed.
    :param stale_grace: seconds after expiry the copy may still answer while it is
        revalidated (the route's ``stale_while_revalidate``); 0: never.
    """
    if immutable:
        return Action.SERVE
    if expires is None:
        return Action.ASK
    due = check_due(fetched, now, wants_check, revalidate_window)
    if now < expires and not due:
        return Action.SERVE
    if stale_grace > 0 and now < expires + stale_grace and not due:
        return Action.SERVE_STALE
    return Action.ASK
