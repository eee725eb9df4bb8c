"""The one error type of the upstream side (its own module: every part raises it)."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer usefully.

    :ivar kind: a short word for metrics and logs: ``connect``, ``timeout``, ``tls``,
        ``redirect``, ``protocol``.
    :ivar gateway_status: the status to answer a client with (502 or 504).
    """

    def __init__(self, kind: str, message: str, gateway_status: int = 502) -> None:
        self.kind = kind
        self.gateway_status = gateway_status
        super().__init__(message)
