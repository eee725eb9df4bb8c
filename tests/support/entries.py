"""Committing a body straight into a cache store, as a fetch would have stored it."""

from __future__ import annotations

import hashlib

from pkgproxy.cache.store import CacheStore, Entry


def commit(store: CacheStore, key: str, url: str, body: bytes, now: float, ttl: float) -> Entry:
    """Commit ``body`` under ``key`` (``url`` upstream, fresh for ``ttl`` seconds from
    ``now``); the store's pool must run inline (``DiskPool(None)``)."""
    temp = store.temp_name(key)
    with open(temp, "wb") as f:
        f.write(body)
    entry = Entry(
        key=key,
        url=url,
        file="",
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        headers={},
        etag=None,
        last_modified=None,
        fetched=now,
        expires=now + ttl,
        last_access=now,
    )
    committed: list[Entry] = []
    store.commit(entry, temp).addCallback(committed.append)
    assert len(committed) == 1, "the store's pool must run inline"
    return committed[0]
