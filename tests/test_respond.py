"""The responders that need no disk: the proxy's own errors and local answers, small
upstream answers; and the one state a request has (its Exchange)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from pkgproxy.config.model import Route
from pkgproxy.families import LocalAnswer
from pkgproxy.web.exchange import Exchange, Trace
from pkgproxy.web.respond import Error, Local, Responder, Small

ROUTE = Route("docker.io", "oci", "/v2/", "http://up.test/v2/")
PLAIN = Route("debian", "debian", "/debian/", "http://up.test/debian/")


def exchange(route: Route = PLAIN, method: bytes = b"GET") -> tuple[Exchange, DummyRequest]:
    request = DummyRequest([b""])
    request.method = method
    ex = Exchange(request, Trace(0.0), route, "x", "key", route.upstream + "x")  # type: ignore[arg-type]
    return ex, request


def header(request: DummyRequest, name: bytes) -> bytes | None:
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1] if values else None


class ResponderTests(SynchronousTestCase):
    def send(self, responder: Responder, ex: Exchange) -> None:
        responder.respond(ex)

    def test_error_plain_and_in_the_family_format(self) -> None:
        ex, req = exchange()
        self.send(Error(503, "offline mode"), ex)
        self.assertEqual(
            (req.responseCode, b"".join(req.written)), (503, b"pkgproxy: offline mode\n")
        )
        self.assertEqual(req.finished, 1)
        ex, req = exchange(ROUTE)
        self.send(Error(404, "no such tag"), ex)
        doc = json.loads(b"".join(req.written))
        self.assertEqual(doc["errors"][0]["code"], "NAME_UNKNOWN")
        self.assertEqual(header(req, b"content-type"), b"application/json")

    def test_nothing_written_to_a_client_gone(self) -> None:
        ex, req = exchange()
        ex.gone = True
        self.send(Error(502, "upstream failed"), ex)
        self.assertEqual((req.written, req.finished), ([], 0))

    def test_local_answer_and_head(self) -> None:
        answer = LocalAnswer(200, "{}", None, "application/json", {"X-Api": "2"})
        for method, body in ((b"GET", b"{}"), (b"HEAD", b"")):
            ex, req = exchange(ROUTE, method)
            self.send(Local(answer), ex)
            self.assertEqual((req.responseCode, b"".join(req.written)), (200, body))
            self.assertEqual(header(req, b"content-length"), b"2")
            self.assertEqual(header(req, b"x-api"), b"2")

    def test_local_redirect_is_an_error_with_location(self) -> None:
        ex, req = exchange()
        self.send(Local(LocalAnswer(301, "moved", "http://elsewhere.test/")), ex)
        self.assertEqual(req.responseCode, 301)
        self.assertEqual(header(req, b"location"), b"http://elsewhere.test/")
        self.assertEqual(b"".join(req.written), b"pkgproxy: moved\n")

    def test_small_upstream_answer(self) -> None:
        ex, req = exchange()
        self.send(Small(404, {b"content-type": b"text/html"}, b"<p>no</p>", b"HIT"), ex)
        self.assertEqual((req.responseCode, b"".join(req.written)), (404, b"<p>no</p>"))
        self.assertEqual(header(req, b"x-cache"), b"HIT")
        self.assertEqual(header(req, b"via"), b"1.1 pkgproxy")


class ExchangeTests(SynchronousTestCase):
    def test_gone_when_the_client_leaves(self) -> None:
        ex, req = exchange()
        ex.watch()
        self.assertFalse(ex.gone)
        req.processingFailed(Exception("client left"))  # type: ignore[no-untyped-call]
        self.assertTrue(ex.gone)
