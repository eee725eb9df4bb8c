"""pkgproxy-warm's readers: what each lock file and list pins (pure functions)."""

from __future__ import annotations

import base64
import hashlib
import json

from twisted.trial.unittest import TestCase

from pkgproxy.warm import aptroot, sources
from pkgproxy.warm.runner import WarmError, _platform, plan
from pkgproxy.warm.sources import SourceError, Want

SHA_A = "a" * 64
SHA_B = "b" * 64


class RequirementsTests(TestCase):
    def test_hashes_over_continuation_lines(self) -> None:
        text = (
            "# via pip-compile\n"
            "--index-url https://pypi.org/simple\n"
            f"Requests[socks]==2.31.0 \\\n    --hash=sha256:{SHA_A} \\\n"
            f"    --hash=sha256:{SHA_B}\n"
            f"zope.interface==6.0 --hash=sha256:{SHA_A}  # via x\n"
        )
        wants = sources.read("requirements.txt", text)
        self.assertEqual(
            wants,
            [
                Want("pypi", "requests", "2.31.0", (("sha256", SHA_A), ("sha256", SHA_B))),
                Want("pypi", "zope-interface", "6.0", (("sha256", SHA_A),)),
            ],
        )

    def test_unpinned_or_unhashed_is_one_clear_error(self) -> None:
        e = self.assertRaises(SourceError, sources.read, "requirements.txt", "flask>=2\n")
        self.assertIn("requirements.txt:1", str(e))
        self.assertIn("not pinned", str(e))
        e = self.assertRaises(SourceError, sources.read, "requirements.txt", "flask==2.0\n")
        self.assertIn("has no --hash", str(e))

    def test_unknown_name_asks_for_family(self) -> None:
        e = self.assertRaises(SourceError, sources.read, "stuff.lst", "x")
        self.assertIn("--family", str(e))


class TomlLockTests(TestCase):
    def test_uv_lock_skips_the_project_itself(self) -> None:
        text = f"""
version = 1
[[package]]
name = "app"
version = "0.1"
source = {{ editable = "." }}

[[package]]
name = "Six"
version = "1.16.0"
source = {{ registry = "https://pypi.org/simple" }}
sdist = {{ url = "https://files.pythonhosted.org/s.tar.gz", hash = "sha256:{SHA_A}", size = 1 }}
wheels = [{{ url = "https://files.pythonhosted.org/s.whl", hash = "sha256:{SHA_B}", size = 1 }}]
"""
        wants = sources.read("uv.lock", text)
        self.assertEqual(
            wants, [Want("pypi", "six", "1.16.0", (("sha256", SHA_A), ("sha256", SHA_B)))]
        )

    def test_pylock_and_poetry(self) -> None:
        pylock = f"""
lock-version = "1.0"
[[packages]]
name = "six"
version = "1.16.0"
wheels = [{{ url = "https://x/six.whl", hashes = {{ sha256 = "{SHA_A}" }} }}]
"""
        self.assertEqual(
            sources.read("pylock.toml", pylock),
            [Want("pypi", "six", "1.16.0", (("sha256", SHA_A),))],
        )
        poetry = f"""
[[package]]
name = "six"
version = "1.16.0"
files = [{{ file = "six.whl", hash = "sha256:{SHA_B}" }}]
"""
        self.assertEqual(
            sources.read("poetry.lock", poetry),
            [Want("pypi", "six", "1.16.0", (("sha256", SHA_B),))],
        )

    def test_bad_toml_names_the_file(self) -> None:
        e = self.assertRaises(SourceError, sources.read, "uv.lock", "[[package]\n")
        self.assertIn("uv.lock: not valid TOML", str(e))


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class NpmLockTests(TestCase):
    def test_package_lock_v3(self) -> None:
        lock = {
            "lockfileVersion": 3,
            "packages": {
                "": {"name": "app"},
                "node_modules/a": {
                    "version": "1.0.0",
                    "resolved": "https://registry.npmjs.org/a/-/a-1.0.0.tgz",
                    "integrity": _sri(b"a"),
                },
                "node_modules/a/node_modules/@s/b": {
                    "version": "2.0.0",
                    "resolved": "https://registry.npmjs.org/@s/b/-/b-2.0.0.tgz",
                    "integrity": _sri(b"b"),
                },
                "node_modules/local": {"resolved": "file:../local", "link": True},
            },
        }
        wants = sources.read("package-lock.json", json.dumps(lock))
        self.assertEqual([(w.name, w.version) for w in wants], [("a", "1.0.0"), ("@s/b", "2.0.0")])
        self.assertEqual(wants[0].digests, (("sha512", hashlib.sha512(b"a").hexdigest()),))

    def test_yarn_v1(self) -> None:
        text = (
            "# yarn lockfile v1\n\n"
            '"@s/b@^2.0.0", "@s/b@^2.0.1":\n'
            '  version "2.0.1"\n'
            '  resolved "https://registry.yarnpkg.com/@s/b/-/b-2.0.1.tgz#abc"\n'
            f"  integrity {_sri(b'x')}\n"
            "  dependencies:\n"
            '    a "^1.0.0"\n\n'
            "a@^1.0.0:\n"
            '  version "1.0.0"\n'
            '  resolved "https://registry.yarnpkg.com/a/-/a-1.0.0.tgz#' + "c" * 40 + '"\n'
        )
        wants = sources.read("yarn.lock", text)
        self.assertEqual([(w.name, w.version) for w in wants], [("@s/b", "2.0.1"), ("a", "1.0.0")])
        self.assertEqual(wants[1].digests, (("sha1", "c" * 40),))
        self.assertEqual(wants[0].url, "https://registry.yarnpkg.com/@s/b/-/b-2.0.1.tgz")

    def test_pnpm_lock_v6_and_v9(self) -> None:
        v9 = (
            "lockfileVersion: '9.0'\n\nimporters:\n  .:\n    dependencies:\n"
            "      a:\n        specifier: ^1\n        version: 1.0.0\n\n"
            "packages:\n\n"
            "  '@s/b@2.0.0':\n"
            f"    resolution: {{integrity: {_sri(b'b')}}}\n"
            "    engines: {node: '>=6'}\n\n"
            "  a@1.0.0:\n"
            f"    resolution: {{integrity: {_sri(b'a')}}}\n\n"
            "snapshots:\n\n  a@1.0.0: {}\n"
        )
        wants = sources.read("pnpm-lock.yaml", v9)
        self.assertEqual([(w.name, w.version) for w in wants], [("@s/b", "2.0.0"), ("a", "1.0.0")])
        self.assertEqual(wants[1].digests, (("sha512", hashlib.sha512(b"a").hexdigest()),))
        v6 = (
            "lockfileVersion: '6.0'\n\npackages:\n\n"
            "  /@s/b@2.0.0(react@18.0.0):\n"
            f"    resolution: {{integrity: {_sri(b'b')}}}\n"
            "    dev: false\n"
        )
        self.assertEqual(
            [(w.name, w.version) for w in sources.read("pnpm-lock.yaml", v6)], [("@s/b", "2.0.0")]
        )


class ListTests(TestCase):
    def test_debian_list_and_selections(self) -> None:
        wants = sources.read("pkgs", "bookworm amd64 curl git\n", "debian")
        self.assertEqual(
            [(w.name, w.extra) for w in wants],
            [("curl", ("bookworm", "amd64"))] * 1 + [("git", ("bookworm", "amd64"))],
        )
        wants = sources.read("sel", "curl\tinstall\nvim\tdeinstall\n", "debian")
        self.assertEqual([w.name for w in wants], ["curl"])
        self.assertRaises(WarmError, plan, wants)
        self.assertEqual(len(plan(wants, suite="bookworm", architecture="amd64")), 1)
        e = self.assertRaises(SourceError, sources.read, "pkgs", "curl git\n", "debian")
        self.assertIn("pkgs:1", str(e))

    def test_image_references(self) -> None:
        self.assertEqual(
            sources.parse_image("python:3.12-slim"), ("docker.io", "library/python", "3.12-slim")
        )
        self.assertEqual(sources.parse_image("ghcr.io/o/app"), ("ghcr.io", "o/app", "latest"))
        self.assertEqual(
            sources.parse_image("localhost:5000/a/b@sha256:" + SHA_A),
            ("localhost:5000", "a/b", "sha256:" + SHA_A),
        )
        e = self.assertRaises(SourceError, sources.read, "images", "ok/x\nBAD NAME\n", "oci")
        self.assertIn("images:2", str(e))

    def test_platform_choice(self) -> None:
        manifests = [
            {
                "digest": "sha256:1",
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {"digest": "sha256:2", "platform": {"os": "linux", "architecture": "amd64"}},
        ]
        self.assertEqual(_platform(manifests, "linux/amd64"), "sha256:2")
        self.assertEqual(_platform(manifests, "linux/arm64/v8"), "sha256:1")
        self.assertIsNone(_platform(manifests, "windows/amd64"))


class WarmupTagTests(TestCase):
    def test_tag_from_user_agent(self) -> None:
        from pkgproxy.admin.metrics import warmup_tag

        self.assertEqual(warmup_tag("pkgproxy-warm/1.0 (ci-nightly)"), "ci-nightly")
        self.assertEqual(warmup_tag("pkgproxy-warm/1.0"), "(untagged)")
        self.assertIsNone(warmup_tag("pip/24.0"))


class AptPrintUrisTests(TestCase):
    def test_parse(self) -> None:
        out = (
            "'http://c:3142/debian/pool/main/c/curl/curl_7_amd64.deb' curl_7_amd64.deb 123 "
            f"SHA256:{SHA_A}\n"
            "'http://c:3142/x.deb' x.deb 5 MD5Sum:00\n"
        )
        self.assertEqual(
            aptroot.parse_print_uris(out),
            [
                aptroot.DebFile(
                    "http://c:3142/debian/pool/main/c/curl/curl_7_amd64.deb", 123, "sha256", SHA_A
                ),
                aptroot.DebFile("http://c:3142/x.deb", 5, "md5", "00"),
            ],
        )
