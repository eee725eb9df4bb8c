"""Whether a received body is what it must be: pure checks, no I/O.

Given how the transfer ended, how many bytes came, what the upstream announced and what
the decision expects (a size, digests), :func:`check` says the body is good, a broken
transfer (``transfer``), or a complete body that is not what an index or digest says it
must be (``verify``). Only a body with no problem is ever committed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

#: Digest algorithms a response header may name (``Docker-Content-Digest``).
HEADER_ALGORITHMS = ("sha256", "sha512")


@dataclass(frozen=True)
class Problem:
    """Why a body must not be served as complete.

    :ivar kind: ``transfer`` (the transfer broke) or ``verify`` (the body is whole but
        wrong).
    :ivar why: one line.
    """

    kind: str
    why: str


def transfer_error(reason: Failure) -> str | None:
    """Why the body's transfer broke, or ``None`` if it ended as a body may end
    (complete, or delimited by the connection's end)."""
    if reason.check(ResponseDone, PotentialDataLoss):
        return None
    return reason.getErrorMessage()


def open_ended(reason: Failure) -> bool:
    """The body ended with the connection, with no length announced."""
    return reason.check(PotentialDataLoss) is not None


def check(
    *,
    error: str | None,
    written: int,
    announced: int | None,
    size: int | None,
    expected: Mapping[str, str],
    got: Mapping[str, str],
) -> Problem | None:
    """What is wrong with a received body, or ``None``.

    :param error: why the transfer broke (:func:`transfer_error`), ``None`` if it did not.
    :param written: bytes received.
    :param announced: the length the upstream announced, if any.
    :param size: the length the decision expects (an index's), if any.
    :param expected: digests the body must have, by algorithm.
    :param got: the body's digests, by algorithm (at least every one of ``expected``).
    """
    if error is not None:
        return Problem("transfer", f"transfer failed after {written} bytes: {error}")
    if announced is not None and written != announced:
        return Problem("transfer", f"got {written} bytes, upstream announced {announced}")
    if size is not None and written != size:
        return Problem("verify", f"got {written} bytes, the index says {size}")
    for algo, hexdigest in expected.items():
        have = got[algo]
        if have != hexdigest:
            return Problem("verify", f"{algo} mismatch: got {have}, expected {hexdigest}")
    return None


def announced_mismatch(announced: int | None, size: int | None) -> str | None:
    """Why a body whose announced length is not the expected one is refused at once."""
    if size is not None and announced is not None and size != announced:
        return f"upstream length {announced} differs from the expected {size}"
    return None


def named_digest(value: str) -> tuple[str, str] | None:
    """``(algorithm, hex)`` from a digest header's ``algorithm:hex``, if one to check."""
    algo, _, hexd = value.partition(":")
    if algo in HEADER_ALGORITHMS and hexd:
        return algo, hexd.lower()
    return None
