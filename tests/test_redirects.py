"""The redirect rules as a table: pkgproxy.upstream.redirects is pure policy."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config.model import Route
from pkgproxy.upstream.redirects import RedirectPolicy, is_internal

ROUTES = (
    Route(
        name="hub",
        family="oci",
        prefix="/v2/hub/",
        upstream="https://registry-1.docker.io/",
        redirect_hosts=("production.cloudflare.docker.com", "*.r2.cloudflarestorage.com"),
    ),
    Route(
        name="local",
        family="generic",
        prefix="/local/",
        upstream="http://10.0.0.5:8080/",
        redirect_hosts=("blobs.internal.example",),
    ),
    Route(name="pypi", family="pypi", prefix="/pypi/", upstream="https://pypi.org/"),
)


class RedirectPolicyTests(SynchronousTestCase):
    def test_refusals(self) -> None:
        policy = RedirectPolicy(ROUTES)
        hub = "https://registry-1.docker.io/v2/library/debian/blobs/sha256:ab"
        cases = [
            (hub, "https://registry-1.docker.io/v2/other", None),
            (hub, "https://production.cloudflare.docker.com/x", None),
            (hub, "https://abc.r2.cloudflarestorage.com/x", None),
            (hub, "https://pypi.org/simple/", None),  # another route's upstream
            (hub, "https://evil.example/x", "neither a route"),
            (hub, "http://127.0.0.1:9/secret", "internal address 127.0.0.1"),
            (hub, "http://169.254.169.254/latest/meta-data", "internal address"),
            (hub, "http://localhost:3142/x", "internal address"),
            (hub, "https://registry-1.docker.io/_pkgproxy/status", "pkgproxy's own pages"),
            ("http://10.0.0.5:8080/a", "http://10.0.0.5:8080/b", None),
            ("http://10.0.0.5:8080/a", "http://blobs.internal.example/b", None),
        ]
        for start, target, want in cases:
            why = policy.refusal(start, target)
            if want is None:
                self.assertIsNone(why, target)
            else:
                self.assertIsNotNone(why, target)
                assert why is not None
                self.assertIn(want, why, target)

    def test_which_names_may_resolve_internal(self) -> None:
        """A route's own upstream host may resolve anywhere; a host only a redirect
        names may resolve to an internal address only for a route whose upstream is."""
        policy = RedirectPolicy(ROUTES)
        self.assertTrue(policy.may_resolve_internal("registry-1.docker.io"))
        self.assertTrue(policy.may_resolve_internal("PyPI.org."))
        self.assertFalse(policy.may_resolve_internal("production.cloudflare.docker.com"))
        self.assertFalse(policy.may_resolve_internal("abc.r2.cloudflarestorage.com"))
        self.assertFalse(policy.may_resolve_internal("auth.docker.io"))  # a token realm
        self.assertTrue(policy.may_resolve_internal("blobs.internal.example"))

    def test_internal_addresses(self) -> None:
        for host in (
            "127.0.0.1",
            "::1",
            "[::1]",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "localhost",
            "a.localhost",
            "::ffff:127.0.0.1",
        ):
            self.assertTrue(is_internal(host), host)
        for host in ("8.8.8.8", "pypi.org", "2001:4860::8888"):
            self.assertFalse(is_internal(host), host)
