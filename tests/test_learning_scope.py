"""An index being read holds back only the requests it may answer for.

A PyPI project page teaches only of its own project's files, an npm packument only of
its own package's tarballs; so while one is read (verified, not yet learned from), a
request for another package's file goes on at once. Indexes that may list any file of
their family (a Debian Packages file) still hold back the whole family.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.cache.store import CacheStore
from pkgproxy.config import Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import FAMILIES, Facts
from pkgproxy.learning import Learner

PYPI = Route(name="pypi", family="pypi", prefix="/pypi/", upstream="http://up.test/")
NPM = Route(name="npm", family="npm", prefix="/npm/", upstream="http://up.test/npm/")
DEBIAN = Route(name="debian", family="debian", prefix="/debian/", upstream="http://up.test/d/")


#: A fetch whose document was parsed (not relinked): learned from when it is stored.
PARSED: Any = SimpleNamespace(document=None)


class _Settled:
    """What a learner's ``on_settled`` reads of a fetch that stored nothing."""

    entry = None
    learned = None


class LearningScopeTests(SynchronousTestCase):
    def setUp(self) -> None:
        store = CacheStore(tempfile.mkdtemp(), 1 << 30, DiskPool(None), Clock())
        store.startService()
        self.addCleanup(store.stopService)
        self.learner = Learner(Facts(), store, DiskPool(None), (PYPI, NPM, DEBIAN))

    def reading(self, route: Route, path: str) -> Any:
        """Begin reading the index at ``path``; returns its ``on_settled``."""
        on_verified, on_settled = self.learner.hooks(route, path)
        on_verified(PARSED)
        return on_settled

    def test_pypi_page_holds_its_own_files_only(self) -> None:
        settle = self.reading(PYPI, "simple/requests/")
        own = "packages/aa/bb/cc/requests-2.32.0-py3-none-any.whl"
        other = "packages/aa/bb/cc/httpx-0.29.0-py3-none-any.whl"
        self.assertTrue(self.learner.busy(PYPI, own))
        self.assertTrue(self.learner.busy(PYPI, own + ".metadata"))
        self.assertTrue(self.learner.busy(PYPI, "packages/x/requests-2.32.0.tar.gz"))
        self.assertFalse(self.learner.busy(PYPI, other))
        self.assertFalse(self.learner.busy(PYPI, other + ".metadata"))
        # Without a path (or for another family), the family is busy as before.
        self.assertTrue(self.learner.busy(PYPI))
        self.assertFalse(self.learner.busy(NPM, "left-pad/-/left-pad-1.0.0.tgz"))
        waiting = self.learner.idle(PYPI, own)
        free = self.learner.idle(PYPI, other)
        self.assertTrue(free.called)
        self.assertFalse(waiting.called)
        settle(_Settled())
        self.assertTrue(waiting.called)
        self.assertFalse(self.learner.busy(PYPI, own))

    def test_waiter_stays_while_its_own_index_is_read(self) -> None:
        """Another package's index ending does not release a request for this one."""
        settle_a = self.reading(PYPI, "simple/requests/")
        settle_b = self.reading(PYPI, "simple/httpx/")
        waiting = self.learner.idle(PYPI, "packages/r/requests-2.32.0-py3-none-any.whl")
        settle_b(_Settled())
        self.assertFalse(waiting.called)
        settle_a(_Settled())
        self.assertTrue(waiting.called)

    def test_npm_packument_holds_its_own_tarballs_only(self) -> None:
        settle = self.reading(NPM, "@types/node")
        self.assertTrue(self.learner.busy(NPM, "@types/node/-/node-20.0.0.tgz"))
        self.assertFalse(self.learner.busy(NPM, "@types/nodes/-/nodes-1.0.0.tgz"))
        self.assertFalse(self.learner.busy(NPM, "express/-/express-4.0.0.tgz"))
        settle(_Settled())
        self.assertFalse(self.learner.busy(NPM, "@types/node/-/node-20.0.0.tgz"))

    def test_an_index_of_no_one_package_holds_the_family(self) -> None:
        """The PyPI project list, or any Debian index, may list anything."""
        settle = self.reading(PYPI, "simple/")
        self.assertTrue(self.learner.busy(PYPI, "packages/h/httpx-0.29.0-py3-none-any.whl"))
        settle(_Settled())
        settle = self.reading(DEBIAN, "dists/bookworm/main/binary-amd64/Packages.xz")
        self.assertTrue(self.learner.busy(DEBIAN, "pool/main/h/hello/hello_2.10-3_amd64.deb"))
        settle(_Settled())
        self.assertFalse(self.learner.busy(DEBIAN, "pool/main/h/hello/hello_2.10-3_amd64.deb"))

    def test_families_that_scope_name_the_owner_as_learn_does(self) -> None:
        pypi, npm = FAMILIES["pypi"], FAMILIES["npm"]
        assert pypi.index_owner is not None and npm.index_owner is not None
        self.assertEqual(pypi.index_owner("simple/Zope.Interface/"), "zope-interface")
        self.assertEqual(pypi.index_owner("pypi/requests/json"), "requests")
        self.assertIsNone(pypi.index_owner("simple/"))
        self.assertEqual(npm.index_owner("@scope/pkg"), "@scope/pkg")
        self.assertEqual(npm.index_owner("pkg/1.0.0"), "pkg")
