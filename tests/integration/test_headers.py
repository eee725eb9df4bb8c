"""Response headers pkgproxy adds or passes on, seen by a real client on a real socket."""

from __future__ import annotations

from tests.integration.harness import IntegrationTestCase, pattern, static


class ContentTypeTests(IntegrationTestCase):
    """What a client is told about the media type of a body."""

    async def test_no_invented_content_type(self) -> None:
        """A body the upstream sent without Content-Type is not labelled ``text/html``.

        pkgproxy does not know what the bytes are (RFC 9110 section 8.3: leave the field
        out, or the client may assume application/octet-stream), so neither the MISS nor
        the HIT may claim HTML, which a browser would render.
        """
        upstream, proxy = await self.files_setup()
        body = pattern(2048, b"untyped")
        upstream.handlers[b"/untyped.bin"] = static(body)
        client = self.client()
        url = proxy.url("/files/untyped.bin")
        miss = await client.get(url)
        await proxy.settled()
        hit = await client.get(url)
        self.assertEqual((miss.x_cache, miss.body), (b"MISS", body))
        self.assertEqual((hit.x_cache, hit.body), (b"HIT", body))
        for result in (miss, hit):
            self.assertIn(
                result.header(b"content-type"),
                (None, b"application/octet-stream"),
                f"{result.x_cache!r} response labelled {result.header(b'content-type')!r}",
            )

    async def test_upstream_content_type_is_kept(self) -> None:
        """The upstream's own Content-Type reaches the client on a MISS and on a HIT."""
        upstream, proxy = await self.files_setup()
        body = b'{"ok": true}\n'
        upstream.handlers[b"/typed.json"] = static(body, [(b"content-type", b"application/json")])
        client = self.client()
        url = proxy.url("/files/typed.json")
        miss = await client.get(url)
        await proxy.settled()
        hit = await client.get(url)
        for result in (miss, hit):
            self.assertEqual(result.body, body)
            self.assertEqual(result.header(b"content-type"), b"application/json")
