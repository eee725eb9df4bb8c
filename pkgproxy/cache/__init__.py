"""The store: cached files and their index on disk, what is known to be absent, freshness.

:mod:`~pkgproxy.cache.store` keeps every body under its key (atomic commits, an LRU bound,
kill -9 safe); :mod:`~pkgproxy.cache.negative` remembers upstream 404s for a while;
:mod:`~pkgproxy.cache.freshness` decides, purely, whether a stored copy may be served;
:mod:`~pkgproxy.cache.keys` names entries. Nothing here speaks HTTP to clients or upstreams.
"""
