"""Request framing: the hit path and twisted.web agree on every request boundary.

The hit path (:mod:`pkgproxy.web.fast`) answers a request head before twisted.web sees
it. If it read a head twisted.web would refuse or split differently (a bare LF, a NUL,
a folded line, a body), one client connection could carry a request the other parser
does not see: request smuggling behind a front proxy. These tests drive the real
:class:`~pkgproxy.web.site.ProxyChannel` over a ``StringTransport`` twice with the same
bytes, once with a hit path that answers every head it accepts and once without one,
and require the same requests, in the same order, with the same answers.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from pkgproxy.web.fast import _parse_head
from pkgproxy.web.site import ProxySite

#: Request heads as real clients send them (apt, pip, npm, containerd, curl).
HEADS = [
    b"GET /debian/pool/main/h/hello/hello_2.10-3_amd64.deb HTTP/1.1\r\n"
    b"Host: cache.test:3142\r\nUser-Agent: Debian APT-HTTP/1.3 (2.6.1)\r\n\r\n",
    b"GET /pypi/simple/requests/ HTTP/1.1\r\nHost: cache.test\r\nUser-Agent: pip/24.0\r\n"
    b"Accept-Encoding: gzip, deflate\r\nAccept: application/vnd.pypi.simple.v1+json\r\n"
    b"Connection: keep-alive\r\n\r\n",
    b"GET /npm/left-pad HTTP/1.1\r\naccept-encoding: gzip,deflate\r\n"
    b"user-agent: npm/10.2.4 node/v20.11.0 linux x64\r\n"
    b"accept: application/vnd.npm.install-v1+json; q=1.0, */*\r\n"
    b"Host: cache.test\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD /v2/library/alpine/manifests/3.19 HTTP/1.1\r\nHost: [::1]:5000\r\n"
    b"User-Agent: containerd/1.7\r\nAccept: application/vnd.oci.image.index.v1+json\r\n\r\n",
    b"GET /files/a.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n\r\n",
    b"POST /npm/-/npm/v1/security/audits/quick HTTP/1.1\r\nHost: cache.test\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
]

#: Bytes a hostile client slips in.
INSERTS = [b"\n", b"\r", b"\x00", b" ", b"\t", b"\x7f", b"\x80", b"\r\n", b"\r\n ", b"\r\n\t", b":"]

#: Header lines that change framing, or try to.
EXTRA = [
    b"Content-Length: 0",
    b"Content-Length: 43",
    b"Content-Length: 5",
    b"Content-Length: +5",
    b"Content-Length: 5, 5",
    b"Content-Length : 5",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding:  chunked ",
    b"Transfer-Encoding: xchunked",
    b"Host: other.test",
    b"Host : cache.test",
    b" folded: continuation",
    b"\tUser-Agent: folded",
    b"Connection: close",
    b"Accept: text/html",
    b"X-Other: 1",
]


@st.composite
def mutated(draw: Any) -> bytes:
    """One real request head, mutated a few ways."""
    data = bytearray(draw(st.sampled_from(HEADS)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["insert", "bare-lf", "duplicate", "extra", "version"]))
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            break  # an insert split the blank line: enough mutation for one head
        lines = bytes(data[:head_end]).split(b"\r\n")
        rest = bytes(data[head_end + 4 :])
        if kind == "insert":
            at = draw(st.integers(0, head_end + 2))
            data[at:at] = draw(st.sampled_from(INSERTS))
            continue
        if kind == "bare-lf" and len(lines) > 1:
            at = draw(st.integers(0, len(lines) - 2))
            data = bytearray(b"\r\n".join(lines[: at + 1]) + b"\n" + b"\r\n".join(lines[at + 1 :]))
            data += b"\r\n\r\n" + rest
            continue
        if kind == "duplicate" and len(lines) > 1:
            at = draw(st.integers(1, len(lines) - 1))
            lines.insert(at, lines[at])
        elif kind == "extra":
            at = draw(st.integers(1, len(lines)))
            lines.insert(at, draw(st.sampled_from(EXTRA)))
        elif kind == "version":
            lines[0] = lines[0] + draw(st.sampled_from([b" x", b"0", b" ", b"\x00"]))
        data = bytearray(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
    return bytes(data)


@st.composite
def streams(draw: Any) -> list[bytes]:
    """Two or three mutated requests on one connection, in one to three reads."""
    whole = b"".join(draw(st.lists(mutated(), min_size=2, max_size=3)))
    cuts = sorted(draw(st.lists(st.integers(1, len(whole) - 1), max_size=2)))
    bounds = [0, *cuts, len(whole)]
    return [whole[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class Echo(Resource):
    """Answers every request with ``ok``, noting what it was asked."""

    isLeaf = True

    def __init__(self, served: list[tuple[bytes, bytes, bytes]]) -> None:
        super().__init__()
        self.served = served

    def render(self, request: Request) -> bytes:
        host = request.getHeader(b"host") or b""
        self.served.append((request.method, request.uri, host))
        return b"ok"


class EveryHead:
    """A hit path with a record for every head it accepts (the most it could answer)."""

    def __init__(self, served: list[tuple[bytes, bytes, bytes]]) -> None:
        self.served = served

    def answer(self, channel: Any, head: bytes) -> bool:
        parsed = _parse_head(head, channel.maxHeaders)
        if parsed is None:
            return False
        method, target, host, _, _, _ = parsed
        self.served.append((method, target, host))
        body = b"ok" if method == b"GET" else b""
        channel.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" + body)
        return True


def run(chunks: list[bytes], hit_path: bool) -> tuple[list[Any], list[bytes], bool]:
    """``(requests served, answer statuses, closed)`` for ``chunks`` on one connection."""
    served: list[tuple[bytes, bytes, bytes]] = []
    site = ProxySite(Echo(served), reactor=Clock())
    site.hit_path = EveryHead(served) if hit_path else None  # type: ignore[assignment]
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        channel.dataReceived(chunk)
    out = transport.value()
    statuses = [line[9:12] for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    channel.connectionLost(None)
    return served, statuses, bool(transport.disconnecting)


class DifferentialTests(TestCase):
    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(streams())
    def test_hit_path_and_twisted_web_agree(self, chunks: list[bytes]) -> None:
        """For every mutated stream: the same requests, the same answers, the same close."""
        self.assertEqual(run(chunks, hit_path=True), run(chunks, hit_path=False), chunks)

    def test_bare_lf_hides_no_second_request(self) -> None:
        """issue 15's example: a bare LF before Content-Length is one bad request, not two."""
        smuggled = b"GET /admin HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 10 + b"\r\n\r\n"
        head = (
            b"GET /files/a.bin HTTP/1.1\r\nHost: x\r\nUser-Agent: a\nContent-Length: %d\r\n\r\n"
            % len(smuggled)
        )
        for hit_path in (True, False):
            served, statuses, closed = run([head + smuggled], hit_path)
            self.assertEqual((served, statuses, closed), ([], [b"400"], True))

    def test_strict_subset(self) -> None:
        """What the hit path refuses: anything but plain CRLF-framed token headers."""
        good = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: a b"
        self.assertIsNotNone(_parse_head(good))
        for bad in (
            good + b"\n",
            good + b"\rX",
            good + b"\x00",
            good + b"\x01",
            good + b"\x80",
            good.replace(b"HTTP/1.1", b"HTTP/1.1 "),
            good.replace(b"HTTP/1.1", b"HTTP/1.10"),
            good.replace(b"GET /a", b"GET  /a"),
            good.replace(b"Host:", b"Host :"),
            good + b"\r\n folded",
            good + b"\r\nHost: y",
            b"GET /a HTTP/1.1\r\nUser-Agent: a",  # no Host
            good.replace(b"Host: x", b"Host: \xd9\xa1"),
        ):
            self.assertIsNone(_parse_head(bad), bad)


class FramingTests(TestCase):
    """twisted.web's path: what RFC 9112 says to refuse is refused, 400 and close."""

    def assert_refused(self, data: bytes) -> None:
        served, statuses, closed = run([data], hit_path=False)
        self.assertEqual((served, statuses, closed), ([], [b"400"], True), data)

    def test_transfer_encoding_other_than_one_chunked(self) -> None:
        """``chunked`` then ``identity``, ``identity`` alone, a list: all refused."""
        head = b"POST /a HTTP/1.1\r\nHost: x\r\n"
        after = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        for codings in (
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"Transfer-Encoding: identity\r\n",
            b"Transfer-Encoding: identity\r\nContent-Length: 0\r\n",
            b"Transfer-Encoding: chunked, identity\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
        ):
            self.assert_refused(head + codings + b"\r\n" + after)
        served, statuses, _ = run([head + b"Transfer-Encoding: chunked\r\n\r\n" + after], False)
        self.assertEqual(served, [(b"POST", b"/a", b"x"), (b"GET", b"/smuggled", b"x")])

    def test_host_missing_twice_or_not_a_host_name(self) -> None:
        """HTTP/1.1 needs exactly one Host, an ASCII host name and port."""
        self.assert_refused(b"GET /a HTTP/1.1\r\nUser-Agent: a\r\n\r\n")
        self.assert_refused(b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
        self.assert_refused(b"GET /a HTTP/1.0\r\nHost: x\r\nHost: x\r\n\r\n")
        for host in (b"\xd9\xa1\xd9\xa2", b"a b", b"u@h", b"h:99999", b"h/x", b"h\x01"):
            self.assert_refused(b"GET /a HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        # HTTP/1.0 may leave Host out; CONNECT names its authority in the target.
        served, _, _ = run([b"GET /a HTTP/1.0\r\n\r\n"], False)
        self.assertEqual(served, [(b"GET", b"/a", b"")])
        for host in (b"cache.test", b"cache.test:3142", b"10.0.0.1:80", b"[fd00::1]:5000"):
            served, _, _ = run([b"GET /a HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"], False)
            self.assertEqual(served, [(b"GET", b"/a", host)])
