"""The public names of upstream URLs (rewrite/public.py): plain data a rewriter is given."""

from __future__ import annotations

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.rewrite.public import ClientNames, PublicMap, PublicRoute

PYPI = PublicRoute("https://pypi.org/simple/", "/pypi/", ("http://pypi.org/simple/",))
FILES = PublicRoute(
    "https://files.pythonhosted.org/",
    "/pypi/files/",
    ("http://files.pythonhosted.org/", "https://files.pythonhosted.org/"),
)
MAP = PublicMap([PYPI, FILES])


class PublicMapTests(SynchronousTestCase):
    def test_reverse_client_gets_its_base(self) -> None:
        names = MAP.names("http://cache:3142")
        self.assertEqual(
            names.public_url("https://files.pythonhosted.org/packages/a.whl"),
            "http://cache:3142/pypi/files/packages/a.whl",
        )
        self.assertIsNone(names.public_url("https://elsewhere.test/a.whl"))
        self.assertEqual(
            names.public_prefix("https://pypi.org/simple/six/"),
            ("https://pypi.org/simple/", "http://cache:3142/pypi/"),
        )

    def test_forward_client_gets_the_forward_prefix_of_its_scheme(self) -> None:
        url = "https://files.pythonhosted.org/packages/a.whl"
        self.assertEqual(
            MAP.names(None, "http").public_url(url), "http://files.pythonhosted.org/packages/a.whl"
        )
        self.assertEqual(MAP.names(None, "https").public_url(url), url)
        self.assertIsNone(MAP.names(None, "https").public_url("https://pypi.org/simple/x/"))

    def test_a_rewriter_is_given_frozen_data(self) -> None:
        """What a rewriter calls, from a pool thread, is the frozen names' own methods."""
        context = MAP.names("http://cache:3142").context("https://pypi.org/simple/six/")
        self.assertEqual(context.page_url, "https://pypi.org/simple/six/")
        names = context.public_url.__self__  # type: ignore[attr-defined]
        self.assertIsInstance(names, ClientNames)
        self.assertTrue(dataclasses.is_dataclass(names))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            names.base = "http://other"  # type: ignore[misc]
