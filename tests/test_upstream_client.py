"""The upstream client's limits and breaker with a scripted agent and a fake clock.

Hostile targets (non-ASCII bytes, control characters) must neither leak a connection
slot nor count against the upstream; waiting for a slot is bounded; only the
upstream's own failures open its circuit.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from pkgproxy.config import UpstreamConfig
from pkgproxy.upstream.client import UpstreamClient, UpstreamError, safe_target

UP = "http://up.test"


class _Response:
    def __init__(self, code: int, headers: dict[bytes, bytes] | None = None) -> None:
        self.code = code
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = 0

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.connectionLost(Failure(net_error.ConnectionDone()))


@implementer(IAgent)
class ScriptedAgent:
    """Answers each request with what :attr:`answer` returns for its URI."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.answer: Any = lambda method, uri: succeed(_Response(200))

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        self.sent.append((method, uri))
        result: Deferred[Any] = self.answer(method, uri)
        return result


class _ClientCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = ScriptedAgent()
        self.config = UpstreamConfig(max_connections_per_host=2, failure_threshold=3)
        self.client = UpstreamClient(self.agent, self.clock, self.config)

    def get(self, url: str) -> tuple[Any, Any]:
        """``(response or None, failure value or None)`` of one GET, its slot freed."""
        results: list[Any] = []
        self.client.request(b"GET", url).addCallbacks(results.append, results.append)
        self.assertEqual(len(results), 1, "answered synchronously")
        r = results[0]
        if isinstance(r, Failure):
            return None, r.value
        r.discard()
        return r, None


class TargetTests(_ClientCase):
    def test_non_ascii_targets_are_encoded_and_free_their_slot(self) -> None:
        """Twenty targets with a byte over 0x7f (as twisted.web hands them on) are sent
        percent-encoded; no slot is left taken, so the host keeps working."""
        for n in range(20):
            resp, err = self.get(f"{UP}/gen/x?{n}\x80")
            self.assertIsNone(err)
        self.assertEqual(self.agent.sent[-1][1], b"http://up.test/gen/x?19%80")
        self.assertEqual(self.client.active(), 0)
        resp, err = self.get(f"{UP}/ok")
        self.assertEqual(resp.status, 200)

    def test_control_character_refused_before_slot_and_not_counted(self) -> None:
        """A DEL or a CR in a target is the client's fault: 400, nothing sent, no slot
        taken, and any number of them leaves the upstream's circuit closed."""
        for n in range(10):
            _, err = self.get(f"{UP}/gen/x?{n}\x7f")
            self.assertIsInstance(err, UpstreamError)
            self.assertEqual((err.kind, err.gateway_status), ("request", 400))
        _, err = self.get(f"{UP}/a\r\nX-Evil: 1")
        self.assertEqual(err.kind, "request")
        self.assertEqual(self.agent.sent, [])
        self.assertEqual(self.client.active(), 0)
        resp, err = self.get(f"{UP}/ok")
        self.assertEqual(resp.status, 200)

    def test_safe_target(self) -> None:
        """Spaces and non-ASCII are percent-encoded, controls refused, the rest kept."""
        self.assertEqual(safe_target("http://h/a b\xe9?q=%41"), "http://h/a%20b%E9?q=%41")
        self.assertEqual(safe_target("http://h/\u20ac"), "http://h/%E2%82%AC")
        self.assertRaises(UpstreamError, safe_target, "http://h/\x00")

    def test_redirect_to_non_ascii_location_frees_slots(self) -> None:
        """A redirect to a Location with non-ASCII bytes is followed percent-encoded."""

        def answer(method: bytes, uri: bytes) -> Deferred[Any]:
            if uri.endswith(b"/old"):
                return succeed(_Response(302, {b"location": b"/new\xff"}))
            return succeed(_Response(200))

        self.agent.answer = answer
        for _ in range(5):
            resp, err = self.get(f"{UP}/old")
            self.assertIsNone(err)
            self.assertEqual(resp.url, f"{UP}/new%FF")
        self.assertEqual(self.client.active(), 0)


class BreakerTests(_ClientCase):
    def test_local_request_failures_never_open_the_circuit(self) -> None:
        """A request the agent refused to write (a bad header value, say) fails that
        request only; the next good request still goes upstream."""
        self.agent.answer = lambda m, u: fail(RequestGenerationFailed([Failure(ValueError("x"))]))
        for _ in range(10):
            _, err = self.get(f"{UP}/a")
            self.assertIsNotNone(err)
        self.agent.answer = lambda m, u: succeed(_Response(200))
        resp, err = self.get(f"{UP}/a")
        self.assertIsNone(err)

    def test_agent_raising_frees_the_slot(self) -> None:
        """An agent that raises instead of failing its Deferred leaks no slot and does
        not count against the upstream."""

        def boom(method: bytes, uri: bytes) -> Deferred[Any]:
            raise ValueError("invalid URI")

        self.agent.answer = boom
        for _ in range(5):
            _, err = self.get(f"{UP}/a")
            self.assertEqual(err.kind, "request")
        self.assertEqual(self.client.active(), 0)
        self.agent.answer = lambda m, u: succeed(_Response(200))
        self.assertIsNone(self.get(f"{UP}/a")[1])

    def test_connect_failures_open_the_circuit(self) -> None:
        """Refused connections do count: after three the upstream is not asked."""
        self.agent.answer = lambda m, u: fail(net_error.ConnectionRefusedError())
        for _ in range(3):
            self.get(f"{UP}/a")
        asked = len(self.agent.sent)
        _, err = self.get(f"{UP}/a")
        self.assertEqual(err.kind, "circuit")
        self.assertEqual(len(self.agent.sent), asked)


class SlotWaitTests(_ClientCase):
    def test_waiting_for_a_slot_is_bounded(self) -> None:
        """With every slot held by a body nobody reads, a new request fails with a 503
        after header_timeout instead of waiting forever, and the breaker stays shut."""
        held = []
        for _ in range(2):
            self.client.request(b"GET", f"{UP}/big").addCallback(held.append)
        self.assertEqual(self.client.active(), 2)
        results: list[Any] = []
        self.client.request(b"GET", f"{UP}/next").addBoth(results.append)
        self.assertEqual(results, [])
        self.clock.advance(self.config.header_timeout + 1)
        self.assertEqual(len(results), 1)
        err = results[0].value
        self.assertEqual((err.kind, err.gateway_status), ("busy", 503))
        held[0].discard()
        self.assertIsNone(self.get(f"{UP}/next")[1])


class RedirectBodyTests(_ClientCase):
    def test_body_never_sent_again_on_redirect(self) -> None:
        """A 307 answering a POST is not followed: the body goes to one place only."""
        self.agent.answer = lambda m, u: succeed(_Response(307, {b"location": b"/elsewhere"}))
        results: list[Any] = []
        self.client.request(b"POST", f"{UP}/-/npm/v1/security/audits", body=b"{}").addBoth(
            results.append
        )
        self.assertEqual(results[0].value.kind, "redirect")
        self.assertEqual(len(self.agent.sent), 1)
        self.assertEqual(self.client.active(), 0)
