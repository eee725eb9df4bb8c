"""Upstreams reached through a real outbound proxy (tinyproxy) started by the test.

plain-http upstreams as absolute-URI requests to the proxy, https ones through a
CONNECT tunnel with TLS to the upstream inside it; credentials from the proxy URL; a
proxy that refuses is a clear 502 naming it.
"""

from __future__ import annotations

from typing import Any

from tests.integration.harness import IntegrationTestCase, ProxyUnderTest, static
from tests.support.outproxy import start_tinyproxy
from tests.support.procs import file_tree, free_port
from tests.support.tlsserver import make_tls_files, start_tls_server


class OutboundProxyTests(IntegrationTestCase):
    timeout = 60

    async def _proxy(self, proxy_url: str, routes: dict[str, Any], **up: Any) -> ProxyUnderTest:
        return await self.start_proxy({"upstream": {"proxy": proxy_url, **up}, "routes": routes})

    async def test_plain_http_upstream_through_proxy_with_credentials(self) -> None:
        """An http:// upstream is asked through the proxy (its Via header shows it),
        with the URL's credentials; the answer is cached as usual."""
        tiny = start_tinyproxy(self, auth=("fleet", "s3cret"))
        up = await self.start_upstream()
        up.handlers[b"/f/a.bin"] = static(b"A" * 1000)
        routes = {"files": {"family": "generic", "immutable": True, "upstream": up.url("/f/")}}
        proxy = await self._proxy(f"http://fleet:s3cret@127.0.0.1:{tiny.port}", routes)
        client = self.client()
        result = await client.get(proxy.url("/files/a.bin"))
        self.assertEqual((result.status, result.body), (200, b"A" * 1000), tiny.log())
        self.assertIn(b"tinyproxy", up.requests[0].headers.get(b"via", b""))
        self.assertNotIn(b"proxy-authorization", up.requests[0].headers)
        await proxy.settled()
        result = await client.get(proxy.url("/files/a.bin"))
        self.assertEqual(result.x_cache, b"HIT")

    async def test_missing_credentials_is_a_clear_502(self) -> None:
        """A proxy asking for credentials pkgproxy does not have: 502 naming the proxy."""
        tiny = start_tinyproxy(self, auth=("fleet", "s3cret"))
        up = await self.start_upstream()
        up.handlers[b"/f/a.bin"] = static(b"A")
        routes = {"files": {"family": "generic", "immutable": True, "upstream": up.url("/f/")}}
        proxy = await self._proxy(f"http://127.0.0.1:{tiny.port}", routes)
        result = await self.client().get(proxy.url("/files/a.bin"))
        self.assertEqual(result.status, 502)
        self.assertIn(f"proxy 127.0.0.1:{tiny.port}".encode(), result.body or b"")
        self.assertEqual(up.requests, [])

    async def test_https_upstream_through_connect_tunnel(self) -> None:
        """An https:// upstream is reached through CONNECT, its certificate verified
        inside the tunnel; the kept tunnel serves the next miss too."""
        tiny = start_tinyproxy(self)
        root = file_tree(self, {"f/a.bin": b"T" * 5000, "f/b.bin": b"U" * 5000})
        tls = make_tls_files(self.mktemp())
        server = start_tls_server(self, root, tls, keepalive=True)
        routes = {"files": {"family": "generic", "immutable": True, "upstream": server.url("/f/")}}
        proxy = await self._proxy(f"http://127.0.0.1:{tiny.port}", routes, ca_bundle=tls.ca_cert)
        client = self.client()
        result = await client.get(proxy.url("/files/a.bin"))
        self.assertEqual((result.status, result.body), (200, b"T" * 5000), tiny.log())
        result = await client.get(proxy.url("/files/b.bin"))
        self.assertEqual((result.status, result.body), (200, b"U" * 5000))
        self.assertIn("CONNECT", tiny.log())
        self.assertEqual(server.connections(), 1)

    async def test_tls_inside_tunnel_is_verified(self) -> None:
        """Through the tunnel, an upstream whose certificate pkgproxy does not trust is
        refused (502 about the certificate), and nothing is stored."""
        tiny = start_tinyproxy(self)
        root = file_tree(self, {"f/a.bin": b"T"})
        tls = make_tls_files(self.mktemp())
        server = start_tls_server(self, root, tls)
        routes = {"files": {"family": "generic", "immutable": True, "upstream": server.url("/f/")}}
        proxy = await self._proxy(f"http://127.0.0.1:{tiny.port}", routes)
        result = await self.client().get(proxy.url("/files/a.bin"))
        self.assertEqual(result.status, 502)
        self.assertIn(b"certificate", (result.body or b"").lower())

    async def test_refusing_proxy_is_a_clear_502(self) -> None:
        """A proxy that refuses this client: the CONNECT for an https upstream and the
        request for an http one both end in a 502 naming the proxy."""
        tiny = start_tinyproxy(self, allow="10.9.9.9")
        up = await self.start_upstream()
        tls = make_tls_files(self.mktemp())
        server = start_tls_server(self, file_tree(self, {"f/a.bin": b"T"}), tls)
        routes = {
            "plain": {"family": "generic", "immutable": True, "upstream": up.url("/f/")},
            "secure": {"family": "generic", "immutable": True, "upstream": server.url("/f/")},
        }
        proxy = await self._proxy(f"http://127.0.0.1:{tiny.port}", routes, ca_bundle=tls.ca_cert)
        client = self.client()
        result = await client.get(proxy.url("/secure/a.bin"))
        self.assertEqual(result.status, 502)
        self.assertIn(f"proxy 127.0.0.1:{tiny.port} refused CONNECT".encode(), result.body or b"")
        self.assertEqual(server.connections(), 0)
        result = await client.get(proxy.url("/plain/a.bin"))
        self.assertNotEqual(result.status, 200)
        self.assertEqual(up.requests, [])

    async def test_no_proxy_hosts_are_reached_directly(self) -> None:
        """A host in no_proxy is asked directly, even with a proxy that would refuse."""
        tiny = start_tinyproxy(self, allow="10.9.9.9")
        up = await self.start_upstream()
        up.handlers[b"/f/a.bin"] = static(b"D")
        routes = {"files": {"family": "generic", "immutable": True, "upstream": up.url("/f/")}}
        proxy = await self._proxy(f"http://127.0.0.1:{tiny.port}", routes, no_proxy=["127.0.0.0/8"])
        result = await self.client().get(proxy.url("/files/a.bin"))
        self.assertEqual((result.status, result.body), (200, b"D"))
        self.assertNotIn(b"via", up.requests[0].headers)


class ParentTests(IntegrationTestCase):
    """``[upstream] parent``: every upstream URL asked of a parent cache as an absolute
    URI (https ones too); direct when the parent cannot be connected to."""

    async def test_https_upstream_asked_of_parent_as_absolute_uri(self) -> None:
        """The parent receives ``GET https://host/path`` and its answer is served and
        cached; the upstream host itself is never resolved or contacted."""
        parent = await self.start_upstream()
        parent.handlers[b"https://registry.invalid/f/a.bin"] = static(b"P" * 300)
        routes = {
            "files": {
                "family": "generic",
                "immutable": True,
                "upstream": "https://registry.invalid/f/",
            }
        }
        proxy = await self.start_proxy(
            {
                "node_name": "branch-7",
                "upstream": {"parent": parent.url("/"), "parent_only": True},
                "routes": routes,
            }
        )
        client = self.client()
        result = await client.get(proxy.url("/files/a.bin"))
        self.assertEqual((result.status, result.body), (200, b"P" * 300))
        self.assertEqual(parent.requests[0].headers.get(b"host"), b"registry.invalid")
        self.assertEqual(parent.requests[0].headers.get(b"via"), b"1.1 branch-7")
        await proxy.settled()
        result = await client.get(proxy.url("/files/a.bin"))
        self.assertEqual(result.x_cache, b"HIT")

    async def test_parent_leading_back_is_refused_as_a_loop(self) -> None:
        """A parent that names the branch's own node (a loop, or two nodes left with one
        name) refuses the request with 508 before any fetch; the branch answers an
        error, the upstream is never asked."""
        up = await self.start_upstream()
        up.handlers[b"/f/a.bin"] = static(b"D")
        routes = {"files": {"family": "generic", "immutable": True, "upstream": up.url("/f/")}}
        parent = await self.start_proxy({"node_name": "twin", "routes": routes})
        branch = await self.start_proxy(
            {
                "node_name": "twin",
                "upstream": {"parent": parent.url("/"), "parent_only": True},
                "routes": routes,
            }
        )
        result = await self.client().get(branch.url("/files/a.bin"))
        self.assertGreaterEqual(result.status, 500)
        self.assertEqual(up.requests, [])

    async def test_unreachable_parent_means_direct(self) -> None:
        """A parent nobody listens on: the request goes direct and succeeds."""
        up = await self.start_upstream()
        up.handlers[b"/f/a.bin"] = static(b"D" * 10)
        routes = {"files": {"family": "generic", "immutable": True, "upstream": up.url("/f/")}}
        proxy = await self.start_proxy(
            {"upstream": {"parent": f"http://127.0.0.1:{free_port()}"}, "routes": routes}
        )
        client = self.client()
        for name in ("a.bin", "a.bin"):
            result = await client.get(proxy.url(f"/files/{name}"))
            self.assertEqual((result.status, result.body), (200, b"D" * 10))
        self.assertEqual(up.count(b"/f/a.bin"), 1)

    async def test_parent_only_with_parent_down_is_a_502_naming_it(self) -> None:
        """``parent_only``: no direct fallback; the 502 names the parent."""
        up = await self.start_upstream()
        up.handlers[b"/f/a.bin"] = static(b"D")
        port = free_port()
        routes = {"files": {"family": "generic", "immutable": True, "upstream": up.url("/f/")}}
        proxy = await self.start_proxy(
            {
                "upstream": {"parent": f"http://127.0.0.1:{port}", "parent_only": True},
                "routes": routes,
            }
        )
        result = await self.client().get(proxy.url("/files/a.bin"))
        self.assertEqual(result.status, 502)
        self.assertIn(f"proxy 127.0.0.1:{port}".encode(), result.body or b"")
        self.assertEqual(up.requests, [])
