"""The real apt-get through pkgproxy in forward (HTTP proxy) mode.

Why this test exists: many fleets do not rewrite their ``sources.list`` but set
``Acquire::http::Proxy`` instead; apt then sends absolute URIs
(``GET http://deb.example.test/debian/dists/...``) to the proxy. pkgproxy must map them onto
a route by its ``forward`` prefixes, serve apt exactly what the reverse path would (signed
InRelease, by-hash indexes, percent-encoded pool names), share one cache entry between both
modes, and refuse every host it was not configured for, so it is never an open proxy.

The forward host ``deb.example.test`` does not resolve, and need not: a client talking to a
proxy never resolves the target host, and pkgproxy fetches from the route's ``upstream``.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from tests.support.aptcase import APT_TIMEOUT, AptTestCase
from tests.support.aptenv import IsolatedApt
from tests.support.procs import start_pkgproxy

HTTP_TIMEOUT = 15.0
FORWARD_BASE = "http://deb.example.test/debian/"
UNCONFIGURED_BASE = "http://unconfigured.example.test/debian/"


@dataclass(frozen=True)
class Reply:
    """One HTTP answer as a test needs it."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def x_cache(self) -> str:
        """The proxy's ``X-Cache`` verdict, or ``""``."""
        return self.headers.get("x-cache", "")


def http_get(url: str, *, proxy: str | None = None, timeout: float = HTTP_TIMEOUT) -> Reply:
    """GET ``url`` with urllib, through ``proxy`` (forward mode) or directly; never raises
    for an HTTP error status. The proxy is set explicitly; the environment is not read."""
    handler = urllib.request.ProxyHandler({"http": proxy} if proxy else {})
    opener = urllib.request.build_opener(handler)
    try:
        with opener.open(urllib.request.Request(url), timeout=timeout) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            return Reply(resp.status, headers, resp.read())
    except urllib.error.HTTPError as e:
        headers = {k.lower(): v for k, v in e.headers.items()}
        body = e.read()
        e.close()
        return Reply(e.code, headers, body)


def upstream_gets(log_path: str, needle: str) -> int:
    """How many GET request lines in a static server's log contain ``needle``."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if '"GET ' in line and needle in line)
    except FileNotFoundError:
        return 0


class AptForwardProxyTests(AptTestCase):
    """apt-get with ``Acquire::http::Proxy`` pointing at pkgproxy and an ``http://`` source."""

    def setUp(self) -> None:
        upstream_url = self.start_repo()
        self.proxy = start_pkgproxy(
            self,
            f'[routes.debian]\nupstream = "{upstream_url}"\nforward = ["{FORWARD_BASE}"]\n',
        )
        self.proxy_url = self.proxy.url("/")
        self.apt = IsolatedApt(
            self.mktemp(), self.repo.sources_line(FORWARD_BASE), proxy=self.proxy_url
        )

    def _proxy_log(self) -> str:
        with open(self.proxy.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_until_hit(self, url: str, *, proxy: str | None = None) -> Reply:
        """GET ``url`` until pkgproxy answers it from disk (the fetch is committed).

        A client has its last byte before the entry is fsynced and indexed; meanwhile a
        second request joins the settling fetch (``COALESCED``) and costs no upstream
        request either. Bounded: fails after 10 s.
        """
        reply = None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            reply = http_get(url, proxy=proxy)
            if reply.status == 200 and reply.x_cache == "HIT":
                return reply
            time.sleep(0.05)
        self.fail(f"{url} never became a cache HIT (last: {reply})\n{self.context()}")

    def test_update_download_then_serve_offline(self) -> None:
        """apt through the proxy (absolute URIs of an unresolvable host) gets every index
        and package intact; with upstream gone and apt's own state wiped, it gets them all
        again from pkgproxy's cache."""
        result = self.ok(self.apt.update(timeout=APT_TIMEOUT))
        self.assertIn(FORWARD_BASE.rstrip("/") + " stable InRelease", result.output)
        self.assertTrue(
            any(n.endswith("_InRelease") for n in self.apt.list_files()),
            f"apt stored no InRelease: {self.apt.list_files()}",
        )
        self.download_and_verify(self.mktemp())
        # apt really spoke forward mode: pkgproxy's access log has its absolute URIs.
        self.assertIn(f"GET {FORWARD_BASE}dists/stable/InRelease", self._proxy_log())
        self.assertIn(f"GET {FORWARD_BASE}pool/", self._proxy_log())

        self.upstream.stop()
        self.apt.wipe()
        self.assertEqual(self.apt.list_files(), [])
        self.ok(self.apt.update(timeout=APT_TIMEOUT))
        self.download_and_verify(self.mktemp())

    def test_reverse_then_forward_is_one_cache_entry(self) -> None:
        """A pool file fetched by the reverse path is a HIT by its forward URI (and the
        other way round): both modes name one cache entry, fetched upstream once."""
        pkg = self.repo.package("pkgproxy-blob")
        reverse_url = self.proxy.url(f"/debian/{pkg.filename}")
        first = http_get(reverse_url)
        self.assertEqual((first.status, first.x_cache), (200, "MISS"), self.context())
        self.assertEqual(hashlib.sha256(first.body).hexdigest(), pkg.sha256)
        self._wait_until_hit(reverse_url)

        forward = http_get(FORWARD_BASE + pkg.filename, proxy=self.proxy_url)
        self.assertEqual((forward.status, forward.x_cache), (200, "HIT"), self.context())
        self.assertEqual(hashlib.sha256(forward.body).hexdigest(), pkg.sha256)
        self.assertEqual(upstream_gets(self.upstream.log_path, pkg.basename), 1, self.context())

        # The other direction, with a name apt percent-encodes (+ -> %2b, ~ -> %7e): the
        # forward request uses apt's spelling, the reverse one the raw characters.
        tilde = self.repo.package("pkgproxy-tilde")
        encoded = tilde.filename.replace("+", "%2b").replace("~", "%7e")
        self.assertNotEqual(encoded, tilde.filename)
        first = http_get(FORWARD_BASE + encoded, proxy=self.proxy_url)
        self.assertEqual((first.status, first.x_cache), (200, "MISS"), self.context())
        self.assertEqual(hashlib.sha256(first.body).hexdigest(), tilde.sha256)
        self._wait_until_hit(FORWARD_BASE + encoded, proxy=self.proxy_url)
        raw = http_get(self.proxy.url(f"/debian/{tilde.filename}"))
        self.assertEqual((raw.status, raw.x_cache), (200, "HIT"), self.context())
        self.assertEqual(hashlib.sha256(raw.body).hexdigest(), tilde.sha256)
        stem = tilde.name + "_"
        self.assertEqual(upstream_gets(self.upstream.log_path, stem), 1, self.context())

    def test_unconfigured_host_is_refused(self) -> None:
        """apt pointed through the proxy at a host no route names fails promptly with a
        403; a direct request gets the same 403 with a reason; nothing reaches upstream."""
        before = upstream_gets(self.upstream.log_path, "/")
        stranger = IsolatedApt(
            self.mktemp(), self.repo.sources_line(UNCONFIGURED_BASE), proxy=self.proxy_url
        )
        result = stranger.update(timeout=APT_TIMEOUT)
        self.assertFalse(result.timed_out, result.report())
        self.assertIn("403", result.output, result.report())
        self.assertTrue(
            result.returncode != 0 or result.problems(),
            f"apt reported success for a refused source:\n{result.report()}",
        )
        self.assertFalse(
            any(n.endswith(("_InRelease", "_Release")) for n in stranger.list_files()),
            f"apt stored an index from a refused source: {stranger.list_files()}",
        )
        log = self._proxy_log()
        self.assertTrue(
            re.search(rf'"GET {re.escape(UNCONFIGURED_BASE)}dists/stable/\S+" 403', log),
            f"no 403 for apt's request in pkgproxy's access log\n{self.context()}",
        )

        for url in (
            UNCONFIGURED_BASE + "dists/stable/InRelease",
            "http://deb.example.test:8080/debian/dists/stable/InRelease",  # other port
            "http://deb.example.test/other/dists/stable/InRelease",  # outside the prefix
        ):
            reply = http_get(url, proxy=self.proxy_url)
            self.assertEqual(reply.status, 403, f"{url}: {reply}\n{self.context()}")
            self.assertIn(b"not a configured upstream", reply.body, url)
        self.assertEqual(upstream_gets(self.upstream.log_path, "/"), before, self.context())
