"""A parent tier: branch pkgproxy processes whose ``[upstream] parent`` is a pkgproxy.

Why this test exists: the parent tier's promise is one origin fetch per file for a
branch and its parent together, and a branch that keeps working when its parent is
gone. That takes both halves of real processes: the branch asking for upstream URLs as
absolute URIs (https ones too) with its Via, and the parent serving those URIs from the
entry its by-path clients fill. Everything runs on 127.0.0.1: a local origin (plain
http, counting its requests), an https origin with a CA of the test's own, one parent
and the branches.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading

from twisted.trial.unittest import TestCase

from tests.support.procs import HOST, PkgProxy, file_tree, start_pkgproxy
from tests.support.slowserver import SlowServer, start_slow_server
from tests.support.tlsserver import make_tls_files, start_tls_server

TIMEOUT = 30.0


def get(proxy: PkgProxy, path: str) -> tuple[int, bytes, str]:
    """``(status, body, X-Cache)`` of one request to ``proxy``."""
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.headers.get("X-Cache", "")
    finally:
        conn.close()


def _config(name: str, route: str, upstream: str = "") -> str:
    """A node named ``name``, its metrics (entries committed) open to the test."""
    return f'node_name = "{name}"\nadmin_networks = ["{HOST}/32"]\n{upstream}{route}'


def _route(upstream: str, extra: str = "") -> str:
    """One immutable file route."""
    return f'[routes.files]\nfamily = "generic"\nimmutable = true\nupstream = "{upstream}"\n{extra}'


class ParentTierTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.files = {f"f{i}.bin": os.urandom(64 * 1024 + i) for i in range(6)}
        self.files["slow.bin"] = os.urandom(3 * 1024 * 1024)
        root = file_tree(self, {f"files/{n}": b for n, b in self.files.items()})
        self.origin: SlowServer = start_slow_server(self, root, rate=3_000_000)
        self.route = _route(self.origin.url("/files/"))
        self.parent = start_pkgproxy(self, _config("regional", self.route))

    def branch(self, name: str, parent_only: bool = False) -> PkgProxy:
        upstream = (
            "[upstream]\n"
            f'parent = "http://{HOST}:{self.parent.port}"\n'
            f"parent_only = {'true' if parent_only else 'false'}\n"
        )
        return start_pkgproxy(self, _config(name, self.route, upstream))

    def assertServed(self, proxy: PkgProxy, name: str, cache: str | None = None) -> None:
        status, body, x_cache = get(proxy, f"/files/{name}")
        self.assertEqual((status, len(body)), (200, len(self.files[name])), name)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(self.files[name]).digest())
        if cache is not None:
            self.assertEqual(x_cache, cache, name)

    def test_one_origin_fetch_for_branch_and_parent(self) -> None:
        """A branch's miss is fetched once, through the parent, which keeps it under the
        entry its own clients use; the branch's next request is its own hit; a file only
        the parent has reaches a new branch without the origin; a stampede on two
        branches at once is still one origin fetch."""
        a = self.branch("branch-a")
        self.assertServed(a, "f0.bin", "MISS")
        self.assertEqual(self.origin.requests("/files/f0.bin"), 1)
        a.wait_for_entries(1)
        self.parent.wait_for_entries(1)
        self.assertServed(a, "f0.bin", "HIT")
        self.assertServed(self.parent, "f0.bin", "HIT")  # by path: the branch's entry
        self.assertEqual(self.origin.requests("/files/f0.bin"), 1)

        self.assertServed(self.parent, "f1.bin", "MISS")  # only the parent has it
        b = self.branch("branch-b")
        self.assertServed(b, "f1.bin", "MISS")
        self.assertServed(b, "f0.bin", "MISS")
        self.assertEqual(self.origin.requests("/files/f1.bin"), 1)
        self.assertEqual(self.origin.requests("/files/f0.bin"), 1)

        # About a second at the origin's rate: 8 clients on two branches meet in flight.
        results: list[object] = []
        threads = [
            threading.Thread(
                target=lambda p=p: results.append(get(p, "/files/slow.bin")), daemon=True
            )
            for p in (a, b) * 4
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertEqual(len(results), 8)
        for r in results:
            assert isinstance(r, tuple)
            self.assertEqual((r[0], r[1] == self.files["slow.bin"]), (200, True))
        self.assertEqual(self.origin.requests("/files/slow.bin"), 1)

    def test_parent_stopped(self) -> None:
        """The parent gone: a branch goes direct to the origin; one with ``parent_only``
        answers 502 naming the parent and never touches the origin."""
        direct = self.branch("branch-direct")
        only = self.branch("branch-only", parent_only=True)
        self.assertServed(direct, "f2.bin", "MISS")
        self.parent.stop()
        self.assertServed(direct, "f3.bin", "MISS")
        direct.wait_for_entries(2)
        self.assertServed(direct, "f3.bin", "HIT")
        self.assertEqual(self.origin.requests("/files/f3.bin"), 1)
        status, body, _ = get(only, "/files/f4.bin")
        self.assertEqual(status, 502)
        self.assertIn(f"proxy {HOST}:{self.parent.port}".encode(), body)
        self.assertEqual(self.origin.requests("/files/f4.bin"), 0)

    def test_https_upstream_through_the_parent(self) -> None:
        """An https upstream: the branch asks the parent for ``https://...`` in plain
        HTTP; the parent alone connects to the origin, over TLS it verifies, once."""
        tls = make_tls_files(self.mktemp())
        root = file_tree(self, {"files/t.bin": self.files["f5.bin"]})
        origin = start_tls_server(self, root, tls)
        route = _route(origin.url("/files/"), f'ca_file = "{tls.ca_cert}"\n')
        self.parent.stop()
        self.parent = start_pkgproxy(self, _config("regional", route))
        self.route = route
        self.files["t.bin"] = self.files["f5.bin"]
        self.assertServed(self.branch("branch-c"), "t.bin", "MISS")
        self.assertEqual(origin.connections(), 1)
        self.parent.wait_for_entries(1)
        self.assertServed(self.parent, "t.bin", "HIT")
        self.assertServed(self.branch("branch-d"), "t.bin", "MISS")
        self.assertEqual(origin.connections(), 1)
