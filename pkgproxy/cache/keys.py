"""Cache keys: one place says how a request's key is spelled.

A key is ``route:path`` (the canonical path, with its ``?query`` if any); a family may
put its entries under another scope than the route's name. Suffixes after ``#`` name
other representations of the same URL: a family's variant (``#variant``), a rewritten
copy for one client base (``#@base``) and its gzip form (:data:`PACKED`). ``#`` never
stands in a canonical path, so the path part of a key stays whole.
"""

from __future__ import annotations

#: The cache key suffix of a rewritten document's gzip form, stored beside it (its
#: entry's ``etag`` is the identity document's sha256) and served to clients that take
#: gzip, with ``Vary: Accept-Encoding``.
PACKED = "#gzip"


def cache_key(route: str, path: str) -> str:
    """The cache key of ``path`` (canonical, with its ``?query`` if any) on a route."""
    return f"{route}:{path}"


def split_key(key: str) -> tuple[str, str]:
    """``(route name, path)`` of a cache key made by the proxy resource."""
    route, _, rest = key.partition(":")
    return route, rest.split("?", 1)[0].split("#", 1)[0]


def scoped(key: str, route: str, scope: str) -> str:
    """``key`` of ``route`` filed under a family's shared ``scope`` instead."""
    return scope + key[len(route) :]


def variant(key: str, name: str) -> str:
    """The key of one representation a family names (``Accept``-dependent)."""
    return f"{key}#{name}"


def rewritten(key: str, base: str) -> str:
    """The key of a document rewritten for clients that reach the proxy as ``base``."""
    return f"{key}#@{base}"


def names(key: str, value: str) -> bool:
    """Whether ``key`` is ``value`` or one of its variants or rewritten copies."""
    return key == value or key.startswith((value + "#", value + "@"))
