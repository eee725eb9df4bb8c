"""What indexes teach the cache (pkgproxy/learning.py): the store is real, on a temp
directory, with a synchronous disk pool and a ``Clock``."""

from __future__ import annotations

import gzip
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy import learning
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config.model import Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import Expect, Facts
from pkgproxy.learning import Learner, UpstreamLinks
from tests.support.entries import commit

UPSTREAM = "http://deb.test/debian/"
DEBIAN = Route(
    name="debian",
    family="debian",
    prefix="/debian/",
    upstream=UPSTREAM,
    forward=("http://deb.example/debian/",),
)
PYPI = Route(
    name="pypi-files",
    family="pypi",
    prefix="/pypi/files/",
    upstream="https://files.test/",
    forward=("http://files.test/",),
)
PACKAGES = "dists/stable/main/binary-amd64/Packages.gz"


def packages(*names: str) -> bytes:
    """A gzip Packages index listing ``pool/main/<name>.deb`` for each name."""
    text = "".join(
        f"Package: {n}\nFilename: pool/main/{n}.deb\nSize: 3\nSHA256: {'a' * 64}\n\n" for n in names
    )
    return gzip.compress(text.encode())


#: A fetch whose document was parsed (not relinked): learned from when it is stored.
PARSED: Any = SimpleNamespace(document=None)


class UpstreamLinksTests(SynchronousTestCase):
    def test_links_map_back(self) -> None:
        """A link through the proxy (path prefix or forward URL) maps to the upstream
        URL; an upstream URL and a foreign one stay as they are."""
        links = UpstreamLinks((DEBIAN, PYPI))
        table = (
            ("http://cache:3142/debian/pool/a.deb", UPSTREAM + "pool/a.deb"),
            ("https://other-name:1/pypi/files/x.whl", "https://files.test/x.whl"),
            ("http://deb.example/debian/pool/a.deb", UPSTREAM + "pool/a.deb"),
            (UPSTREAM + "pool/a.deb", UPSTREAM + "pool/a.deb"),
            ("https://elsewhere.test/x", "https://elsewhere.test/x"),
        )
        for url, want in table:
            self.assertEqual(links(url), want, url)


class LearnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.pool = DiskPool(None)
        self.dir = self.mktemp()
        self.store = self.new_store()
        self.facts = Facts()
        self.learner = Learner(self.facts, self.store, self.pool, (DEBIAN,))

    def new_store(self) -> CacheStore:
        store = CacheStore(self.dir, 1 << 30, self.pool, self.clock)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def put(self, path: str, body: bytes, store: CacheStore | None = None) -> Entry:
        """Commit ``body`` as the cached copy of ``path`` of the Debian route."""
        return commit(
            store or self.store, "debian:" + path, UPSTREAM + path, body, self.clock.seconds(), 60
        )

    def learned(self, entry: Entry) -> int:
        out: list[int] = []
        self.learner.committed(entry).addCallback(out.append)
        self.assertEqual(len(out), 1)
        return out[0]

    def test_committed_index_is_learned_in_chunks(self) -> None:
        """A committed Packages index is handed to its family in chunks and what it lists
        is filed under the upstream URLs."""
        self.patch(learning, "CHUNK", 16)
        seen: list[bytes] = []
        real = learning.FAMILIES["debian"]
        assert real.learn is not None
        learn = real.learn

        def spy(path: str, body: Any, url: str) -> list[tuple[str, Expect]]:
            def chunks() -> Any:
                for chunk in body:
                    seen.append(chunk)
                    yield chunk

            return learn(path, chunks(), url)

        self.patch(learning, "FAMILIES", {**learning.FAMILIES, "debian": replace(real, learn=spy)})
        entry = self.put(PACKAGES, packages("a", "b"))
        self.assertEqual(self.learned(entry), 2)
        self.assertEqual(
            self.facts.get(UPSTREAM + "pool/main/a.deb"), Expect(3, {"sha256": "a" * 64})
        )
        self.assertGreater(len(seen), 2)
        self.assertTrue(all(len(c) <= 16 for c in seen))
        self.assertEqual(entry.readers, 0)  # unpinned

    def test_not_an_index(self) -> None:
        entry = self.put("pool/main/a.deb", b"deb")
        self.assertEqual(self.learned(entry), 0)
        self.assertEqual(len(self.facts), 0)

    def test_bad_index_teaches_nothing(self) -> None:
        """An index that cannot be read is logged and teaches nothing."""
        entry = self.put(PACKAGES, b"\x1f\x8b not gzip at all")
        self.assertEqual(self.learned(entry), 0)
        self.assertEqual(len(self.facts), 0)
        self.assertEqual(entry.readers, 0)

    def test_facts_go_with_the_last_copy(self) -> None:
        """Removing the cached index forgets what it taught."""
        entry = self.put(PACKAGES, packages("a"))
        self.learned(entry)
        self.assertEqual(len(self.facts), 1)
        self.store.remove(entry.key)
        self.assertEqual(len(self.facts), 0)

    def test_busy_from_verified_to_learned(self) -> None:
        """A family is busy from the moment its index is verified until what it lists
        is in the facts; ``idle`` fires then."""
        on_verified, on_settled = self.learner.hooks(
            DEBIAN, "dists/stable/main/binary-amd64/Packages"
        )
        self.assertFalse(self.learner.busy(DEBIAN))
        on_verified(PARSED)
        self.assertTrue(self.learner.busy(DEBIAN))
        idle: list[None] = []
        self.learner.idle(DEBIAN).addCallback(idle.append)
        self.assertEqual(idle, [])
        entry = self.put(PACKAGES, packages("a"))

        class Settled:
            learned = None

        fetch: Any = Settled()
        fetch.entry = entry
        on_settled(fetch)
        self.assertEqual(idle, [None])
        self.assertFalse(self.learner.busy(DEBIAN))
        self.assertIsNotNone(self.facts.get(UPSTREAM + "pool/main/a.deb"))

    def test_settled_without_an_entry(self) -> None:
        """A verified index that was not stored ends the busy time, teaching nothing."""
        on_verified, on_settled = self.learner.hooks(
            DEBIAN, "dists/stable/main/binary-amd64/Packages"
        )
        on_verified(PARSED)
        fetch: Any = type("Settled", (), {"entry": None, "learned": None})()
        on_settled(fetch)
        self.assertFalse(self.learner.busy(DEBIAN))

    def test_learned_while_rewritten(self) -> None:
        """What a fetch learned while rewriting its document is filed as it is."""
        on_verified, on_settled = self.learner.hooks(
            DEBIAN, "dists/stable/main/binary-amd64/Packages"
        )
        on_verified(PARSED)
        entry = self.put(PACKAGES, packages())
        taught = [(UPSTREAM + "pool/x.deb", Expect(1))]
        fetch: Any = type("Settled", (), {"entry": entry, "learned": taught})()
        on_settled(fetch)
        self.assertEqual(self.facts.get(UPSTREAM + "pool/x.deb"), Expect(1))

    def test_relearn_on_start(self) -> None:
        """On start every cached index is read again; the learner is then ready."""
        self.put(PACKAGES, packages("a", "b"))
        self.put("pool/main/a.deb", b"deb")
        store = self.new_store()  # the same directory, as after a restart
        facts = Facts()
        learner = Learner(facts, store, self.pool, (DEBIAN,))
        self.assertFalse(learner.ready)
        done: list[None] = []
        learner.relearn().addCallback(done.append)
        self.assertEqual((done, learner.ready, len(facts)), ([None], True, 2))

    def test_relearn_with_nothing_cached(self) -> None:
        done: list[None] = []
        self.learner.relearn().addCallback(done.append)
        self.assertEqual((done, self.learner.ready), ([None], True))
