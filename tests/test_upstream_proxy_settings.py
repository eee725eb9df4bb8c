"""Which upstreams go through the outbound proxy: config, environment, no_proxy."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import ConfigError, config_from_dict
from pkgproxy.upstream.proxy import NoProxy, ProxyConfigError, parse_proxy, proxy_settings


class ProxySettingsTests(SynchronousTestCase):
    def test_config_wins_over_environment(self) -> None:
        """``[upstream] proxy`` applies to both schemes; the environment is then unread."""
        env = {"https_proxy": "http://env:1", "http_proxy": "http://env:2"}
        s = proxy_settings("http://corp:3128", None, env)
        self.assertEqual(s.for_origin("https", "pypi.org").name, "corp:3128")  # type: ignore[union-attr]
        self.assertEqual(s.for_origin("http", "deb.debian.org").name, "corp:3128")  # type: ignore[union-attr]

    def test_empty_proxy_switches_environment_off(self) -> None:
        """``proxy = ""`` means direct, whatever the environment says."""
        s = proxy_settings("", None, {"https_proxy": "http://env:1"})
        self.assertFalse(s.active)

    def test_environment_as_curl_reads_it(self) -> None:
        """https_proxy/HTTPS_PROXY for https, only lower-case http_proxy for http, and
        no_proxy/NO_PROXY."""
        s = proxy_settings(
            None,
            None,
            {"HTTPS_PROXY": "envs:1", "HTTP_PROXY": "http://ignored:2", "NO_PROXY": ".internal"},
        )
        self.assertEqual(s.for_origin("https", "pypi.org").name, "envs:1")  # type: ignore[union-attr]
        self.assertIsNone(s.for_origin("http", "deb.debian.org"))
        self.assertIsNone(s.for_origin("https", "mirror.internal"))

    def test_no_proxy_matching(self) -> None:
        """Domains match themselves and below, CIDR ranges addresses, ``*`` everything."""
        n = NoProxy(["example.com", ".corp.test", "10.0.0.0/8", "::1"])
        self.assertTrue(n.matches("example.com"))
        self.assertTrue(n.matches("a.example.com"))
        self.assertFalse(n.matches("badexample.com"))
        self.assertTrue(n.matches("x.corp.test"))
        self.assertTrue(n.matches("10.1.2.3"))
        self.assertFalse(n.matches("11.1.2.3"))
        self.assertTrue(n.matches("::1"))
        self.assertTrue(NoProxy(["*"]).matches("anything"))

    def test_credentials_from_url(self) -> None:
        """User and password (percent-decoded) become Proxy-Authorization: Basic."""
        p = parse_proxy("http://us%40er:p%3Ass@proxy:3128")
        self.assertEqual(p.authorization, b"Basic dXNAZXI6cDpzcw==")
        self.assertEqual(p.name, "proxy:3128")
        self.assertRaises(ProxyConfigError, parse_proxy, "https://proxy:3128")

    def test_config_keys(self) -> None:
        """The keys are checked at load, with the key named in the error."""
        cfg = config_from_dict({"upstream": {"proxy": "http://p:3128", "no_proxy": ["a.b"]}})
        self.assertEqual((cfg.upstream.proxy, cfg.upstream.no_proxy), ("http://p:3128", ("a.b",)))
        with self.assertRaises(ConfigError) as e:
            config_from_dict({"upstream": {"proxy": "socks5://p:1080"}})
        self.assertEqual(e.exception.key, "upstream.proxy")
        with self.assertRaises(ConfigError) as e:
            config_from_dict({"upstream": {"proxy": "http://p:1", "parent": "http://q:2"}})
        self.assertEqual(e.exception.key, "upstream.parent")
        with self.assertRaises(ConfigError) as e:
            config_from_dict({"routes": {"docker.io": {"redirect_hosts": ["bad host"]}}})
        self.assertEqual(e.exception.key, "routes.docker.io.redirect_hosts[0]")
        self.assertIn(
            "production.cloudflare.docker.com",
            next(r for r in config_from_dict({}).routes if r.name == "docker.io").redirect_hosts,
        )
