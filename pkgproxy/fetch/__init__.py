"""One upstream fetch, shared by every client that wants it (single flight).

:mod:`~pkgproxy.fetch.fetch` is the state machine, :mod:`~pkgproxy.fetch.registry` the
one fetch per key; :mod:`~pkgproxy.fetch.body` buffers and hashes the body as it comes,
:mod:`~pkgproxy.fetch.verify` checks it (pure) and :mod:`~pkgproxy.fetch.finish` decides
what is stored. Rule: nothing is committed that was not verified, and no client sees a
clean end of a body that then fails its checks.
"""
