"""Configuration: defaults, overrides by route name, and errors that name the key."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import ConfigError, config_from_dict, load_config, parse_duration, parse_size
from pkgproxy.tap import Options


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With no file: tcp:3142, ./pkgproxy-cache, 10 GiB and the built-in routes."""
        cfg = load_config(None)
        self.assertEqual(cfg.listen, ("tcp:3142",))
        self.assertEqual(cfg.cache.dir, "pkgproxy-cache")
        self.assertEqual(cfg.cache.max_size, 10 * 1024**3)
        names = {r.name: r for r in cfg.routes}
        self.assertEqual(names["debian"].upstream, "https://deb.debian.org/debian/")
        self.assertEqual(names["debian-security"].prefix, "/debian-security/")

    def test_override_builtin_route(self) -> None:
        """A route of a built-in name changes only the keys given."""
        cfg = config_from_dict({"routes": {"debian": {"upstream": "http://127.0.0.1:9/d/"}}})
        r = {r.name: r for r in cfg.routes}["debian"]
        self.assertEqual(
            (r.upstream, r.prefix, r.family), ("http://127.0.0.1:9/d/", "/debian/", "debian")
        )

    def test_new_generic_route(self) -> None:
        """A new route needs a family and an upstream; the prefix defaults to its name."""
        cfg = config_from_dict(
            {"routes": {"files": {"family": "generic", "immutable": True, "upstream": "http://h/"}}}
        )
        r = {r.name: r for r in cfg.routes}["files"]
        self.assertEqual((r.prefix, r.immutable), ("/files/", True))

    def test_disable_route(self) -> None:
        """``enabled = false`` switches a built-in route off."""
        cfg = config_from_dict({"routes": {"debian": {"enabled": False}}})
        self.assertNotIn("debian", [r.name for r in cfg.enabled_routes()])

    def test_units(self) -> None:
        """Sizes and durations take the usual units."""
        self.assertEqual(parse_size("10GiB"), 10 * 1024**3)
        self.assertEqual(parse_size("500MB"), 500 * 1000**2)
        self.assertEqual(parse_size(1234), 1234)
        self.assertEqual(parse_duration("10m"), 600.0)
        self.assertEqual(parse_duration("60s"), 60.0)
        self.assertEqual(parse_duration(5), 5.0)
        self.assertEqual(config_from_dict({"cache": {"memory": "1MiB"}}).cache.memory, 1024**2)
        self.assertEqual(config_from_dict({"cache": {"memory": 0}}).cache.memory, 0)
        self.assertEqual(config_from_dict({}).cache.check_interval, 10.0)
        cache = config_from_dict({"cache": {"check_interval": "2s"}}).cache
        self.assertEqual(cache.check_interval, 2.0)

    def assertConfigError(self, data: dict, key: str) -> str:
        e = self.assertRaises(ConfigError, config_from_dict, data)
        self.assertEqual(e.key, key)
        self.assertTrue(str(e).startswith(key + ": "), str(e))
        return str(e)

    def test_errors_name_the_key(self) -> None:
        """Every bad value is reported with the key it is under."""
        self.assertConfigError({"cache": {"max_size": "lots"}}, "cache.max_size")
        self.assertConfigError({"cache": {"sizee": 1}}, "cache.sizee")
        self.assertConfigError({"cache": {"memory": "much"}}, "cache.memory")
        self.assertConfigError({"listen": 3142}, "listen")
        self.assertConfigError({"upstream": {"idle_timeout": "soon"}}, "upstream.idle_timeout")
        self.assertConfigError(
            {"limits": {"disk_error_memory": "lots"}}, "limits.disk_error_memory"
        )
        for bad in ("0s", "soon"):
            self.assertConfigError(
                {"limits": {"request_head_timeout": bad}}, "limits.request_head_timeout"
            )
            self.assertConfigError({"cache": {"check_interval": bad}}, "cache.check_interval")
        self.assertConfigError({"routes": {"x": {"family": "generic"}}}, "routes.x.upstream")
        self.assertConfigError(
            {"routes": {"x": {"family": "nope", "upstream": "http://h/"}}}, "routes.x.family"
        )
        msg = self.assertConfigError(
            {"routes": {"debian": {"upstream": "http://h/debian"}}}, "routes.debian.upstream"
        )
        self.assertIn("http://h/debian/", msg)
        self.assertConfigError(
            {"routes": {"debian": {"upstream": "ftp://h/"}}}, "routes.debian.upstream"
        )
        self.assertConfigError(
            {"routes": {"x": {"family": "generic", "upstream": "http://h/", "prefix": "/debian/"}}},
            "routes.x.prefix",
        )
        self.assertConfigError({"admin_networks": ["not-a-net"]}, "admin_networks[0]")

    def test_bad_toml_file(self) -> None:
        """A file that is not TOML is reported with its name."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("listen = [\n")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertIn(path, str(e))


class FamilyPrefixRootTests(SynchronousTestCase):
    """A family's prefix root (OCI's /v2/) holds its routes, and only its routes."""

    def _prefix(self, **route: str) -> str:
        cfg = config_from_dict({"routes": {"reg": route}})
        return next(r.prefix for r in cfg.routes if r.name == "reg")

    def test_oci_route_without_a_prefix_lives_under_v2(self) -> None:
        self.assertEqual(self._prefix(family="oci", upstream="https://r.example/v2/"), "/v2/reg/")

    def test_oci_route_outside_v2_is_refused(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self._prefix(family="oci", upstream="https://r.example/v2/", prefix="/reg/")
        self.assertEqual(e.exception.key, "routes.reg.prefix")
        self.assertIn("/v2/ is where OCI registries live", str(e.exception))

    def test_other_family_under_v2_is_refused(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self._prefix(family="generic", upstream="https://r.example/", prefix="/v2/reg/")
        self.assertEqual(e.exception.key, "routes.reg.prefix")


class OptionsTests(SynchronousTestCase):
    def test_overrides(self) -> None:
        """Command-line options win over the file and the defaults."""
        o = Options()
        o.parseOptions(
            [
                "--listen",
                "tcp:0",
                "--listen",
                "tcp:1",
                "--cache-dir",
                "/tmp/x",
                "--max-size",
                "1GiB",
            ]
        )
        self.assertEqual(o.config.listen, ("tcp:0", "tcp:1"))
        self.assertEqual((o.config.cache.dir, o.config.cache.max_size), ("/tmp/x", 1024**3))

    def test_bad_listen(self) -> None:
        """A bad strports description is a usage error naming it."""
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--listen", "tpc:80"])
        self.assertIn("tpc:80", str(e))

    def test_refuses_without_service_identity(self) -> None:
        """Without service_identity TLS host names would go unchecked: refuse to start."""
        from pkgproxy import tap

        def missing() -> None:
            raise ImportError("service_identity")

        self.patch(tap, "require_service_identity", missing)
        e = self.assertRaises(usage.UsageError, Options().parseOptions, [])
        self.assertIn("service_identity", str(e))

    def test_bad_max_size(self) -> None:
        """A bad --max-size is a usage error naming the option."""
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--max-size", "big"])
        self.assertIn("--max-size", str(e))


class ShippedConfigTests(SynchronousTestCase):
    def test_example_config_loads(self) -> None:
        """etc/pkgproxy.toml, the annotated reference, is a valid configuration."""
        import os

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = load_config(os.path.join(here, "etc", "pkgproxy.toml"))
        self.assertEqual(cfg.cache.dir, "/var/cache/pkgproxy")


class CredentialConfigTests(SynchronousTestCase):
    def test_credentials_for_a_route(self) -> None:
        """A route's upstream credentials are read from the file or given inline, never
        shown in the route's repr, and must come in pairs."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret\n")
        cfg = config_from_dict(
            {"routes": {"docker.io": {"username": "puller", "password_file": path}}}
        )
        route = {r.name: r for r in cfg.routes}["docker.io"]
        self.assertEqual((route.username, route.password), ("puller", "s3cret"))
        self.assertNotIn("s3cret", repr(route))
        self.assertEqual(cfg.upstream_credentials(), {route.upstream: ("puller", "s3cret")})
        e = self.assertRaises(
            ConfigError, config_from_dict, {"routes": {"docker.io": {"username": "x"}}}
        )
        self.assertEqual(e.key, "routes.docker.io.username")
        e = self.assertRaises(
            ConfigError,
            config_from_dict,
            {"routes": {"docker.io": {"username": "x", "password_file": "/nonexistent"}}},
        )
        self.assertEqual(e.key, "routes.docker.io.password_file")
