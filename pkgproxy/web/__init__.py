"""The HTTP server: the resource tree clients talk to, and the hit path beneath it.

:mod:`~pkgproxy.web.root` dispatches each request to the room that answers it (see
docs/architecture.md, "Inside web/"); :mod:`~pkgproxy.web.site` and
:mod:`~pkgproxy.web.fast` are the channel, its limits and the replay of repeated hits.
Rule: a client gets exactly the bytes that were verified, or a failed transfer.
"""
