"""Writing to a client's or an upstream's plain TCP socket without waiting a reactor turn.

Twisted's TCP transport buffers every write and sends it on the next reactor turn, after
every other socket that became readable meanwhile was handled (and two ``epoll_ctl``
calls and one more wakeup per response). Where the socket is plain TCP and the
transport holds nothing unsent, pkgproxy may write to the socket itself, in order:
these helpers read the few transport attributes that say so.
"""

from __future__ import annotations

from typing import Any


def plain_tcp(transport: Any) -> bool:
    """Whether ``transport`` is a plain (not TLS) TCP socket whose buffer can be seen."""
    return (
        transport is not None
        and hasattr(transport, "socket")
        and hasattr(transport, "_tempDataLen")
        and hasattr(transport, "dataBuffer")
        and hasattr(transport, "offset")
        and hasattr(transport, "producerPaused")
        # Inside an intercepted CONNECT the socket carries TLS: bytes go through it.
        and getattr(transport, "TLS", True) is False
    )


def unsent(transport: Any) -> int:
    """Bytes a :func:`plain_tcp` transport holds that have not reached the socket."""
    return int(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a :func:`plain_tcp` transport, on the socket at once if it can.

    What the socket does not take now (or all of it, if the transport still holds
    earlier bytes) goes through the transport, after whatever it holds.
    """
    if unsent(transport) or not transport.connected or transport.disconnecting:
        transport.write(data)
        return
    try:
        n = transport.socket.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        n = 0  # the transport finds the error on its own next write or read
    if n < len(data):
        transport.write(data[n:] if n else data)


def flush(transport: Any) -> None:
    """Send what a :func:`plain_tcp` transport holds now, not on the next reactor turn.

    A reactor turn handles every socket that became readable before it writes to any:
    sixteen upstream answers arriving together are all processed before the first
    client's response leaves, and sixteen client requests before the first upstream
    request does. Flushing a complete message (a finished response, a request head) the
    moment it is written lets each one go while the others are still being worked on,
    in one ``send`` (no partial message for Nagle to hold back).

    Nothing happens on a transport that is closing (the reactor must see the end of its
    buffer itself to close it) or that holds nothing; an error sending is left for the
    reactor to find on its own next write, as the bytes stay buffered.
    """
    if (
        plain_tcp(transport)
        and unsent(transport)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
    ):
        transport.doWrite()


def no_delay(transport: Any) -> None:
    """Send small segments at once on ``transport``'s TCP socket (``TCP_NODELAY``), also
    beneath TLS.

    With Nagle's algorithm on, a segment smaller than a full one waits for the peer's
    acknowledgement of the previous one, which a peer delays by up to 40 ms: a
    response whose head and body (or last verified byte) leave in two sends arrived
    30-40 ms late. nginx sets it on keep-alive connections too.
    """
    for _ in range(3):
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # closed already, or not TCP after all
            return
        transport = getattr(transport, "transport", None)  # under TLS
        if transport is None:
            return
