"""Single flight: at most one upstream fetch per cache key at a time.

A fetch leaves the registry only after the store holds its result, so a request never
finds neither the entry nor the fetch and starts a second download.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pkgproxy.fetch.fetch import Fetch


class InFlight:
    """Maps cache keys to the fetch in progress for them."""

    def __init__(self) -> None:
        self._fetches: dict[str, Fetch] = {}
        self.started = 0
        self.joined = 0

    def get(self, key: str) -> Fetch | None:
        """The fetch in progress for ``key``, if any."""
        return self._fetches.get(key)

    def join(self, key: str, factory: Callable[[], Fetch]) -> tuple[Fetch, bool]:
        """The fetch for ``key``, made by ``factory`` if there is none.

        A new fetch is not started here: the caller subscribes first and then calls
        ``start()``, so it cannot miss an answer that arrives at once.

        :return: the fetch, and True if this call made it.
        """
        fetch = self._fetches.get(key)
        if fetch is not None:
            self.joined += 1
            return fetch, False
        fetch = factory()
        self._fetches[key] = fetch
        self.started += 1
        fetch.when_settled(self._settled)
        return fetch, True

    def _settled(self, fetch: Fetch) -> None:
        if self._fetches.get(fetch.key) is fetch:
            del self._fetches[fetch.key]

    def __iter__(self) -> Iterator[Fetch]:
        return iter(list(self._fetches.values()))

    def __len__(self) -> int:
        return len(self._fetches)
