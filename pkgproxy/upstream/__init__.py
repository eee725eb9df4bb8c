"""The upstream client: Twisted's ``Agent`` on one persistent connection pool.

Around it, as agents wrapping the agent: per-host connection slots, the circuit breaker
and the head timeout (:mod:`~pkgproxy.upstream.limits`), hedged connects
(:mod:`~pkgproxy.upstream.pool`), the outbound proxy or parent
(:mod:`~pkgproxy.upstream.proxy`); and the rules for redirects
(:mod:`~pkgproxy.upstream.redirects`). Rule: only hosts a route names are contacted.
"""
