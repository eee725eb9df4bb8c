"""``pkgproxy-config``: every snippet is read back by the real tool where it is installed.

apt (``apt-config``, ``apt-get --print-uris update``), pip (``pip config``) and npm
(``npm config get``) each get the generated file in an isolated setup (their own temp
config locations, a clean environment) and must report the server's URL from it. Formats
with no tool on these machines (Docker's daemon.json, containerd's and uv's TOML, apk's
repository list) are parsed with the standard library instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pkgproxy.clientconfig import main
from tests.support.procs import REPO_ROOT, clean_env, pkgproxy_config_text

SERVER = "http://127.0.0.1:3142"


def tool_env(home: str, **extra: str) -> dict[str, str]:
    """An environment with no proxy, pip or npm settings of the machine, HOME in ``home``."""
    env = {
        k: v
        for k, v in clean_env().items()
        if not k.upper().startswith(("PIP_", "NPM_CONFIG_", "APT_", "XDG_"))
    }
    env.update({"HOME": home, "XDG_CONFIG_HOME": os.path.join(home, ".config"), **extra})
    return env


class ClientConfigTestCase(SynchronousTestCase):
    def snippet(self, *args: str) -> str:
        result = pkgproxy_config_text(SERVER, *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("pkgproxy-config: put this in ", result.stderr)
        return result.stdout

    def write(self, name: str, text: str) -> str:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def run_tool(self, argv: list[str], env: dict[str, str]) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(
            result.returncode, 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
        return result.stdout


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SkipTest(f"{tool} is not installed")
    return path


class AptTests(ClientConfigTestCase):
    def test_proxy_snippet_read_by_apt_config(self) -> None:
        """apt-config, reading the snippet from its apt.conf.d, reports the proxy."""
        need("apt-config")
        parts = os.path.dirname(self.write("01pkgproxy", self.snippet("apt")))
        main_conf = self.write(
            "apt.conf",
            f'Dir::Etc::parts "{parts}/";\nDir::Etc::main "{parts}/none.conf";\n',
        )
        home = os.path.abspath(self.mktemp())
        env = tool_env(home, APT_CONFIG=main_conf, LC_ALL="C.UTF-8")
        out = self.run_tool(["apt-config", "shell", "PROXY", "Acquire::http::Proxy"], env)
        self.assertEqual(out.strip(), f"PROXY='{SERVER}/'")
        dump = self.run_tool(["apt-config", "dump"], env)
        self.assertIn(f'Acquire::http::Proxy "{SERVER}/";', dump)

    def test_sources_read_by_apt_get(self) -> None:
        """apt-get, given the deb822 sources, would fetch every index from pkgproxy."""
        need("apt-get")
        from tests.support.aptenv import IsolatedApt

        apt = IsolatedApt(self.mktemp(), "")
        text = self.snippet("apt-sources", "--suite", "bookworm")
        with open(os.path.join(apt.etc, "sources.list.d", "debian.sources"), "w") as f:
            f.write(text)
        result = apt.run(["apt-get", "--print-uris", "update"]).check(clean=True)
        uris = [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("'")]
        self.assertIn(f"{SERVER}/debian/dists/bookworm/InRelease", uris)
        self.assertIn(f"{SERVER}/debian/dists/bookworm-updates/InRelease", uris)
        self.assertIn(f"{SERVER}/debian-security/dists/bookworm-security/InRelease", uris)
        self.assertTrue(all(u.startswith(SERVER + "/") for u in uris), uris)

    def test_ubuntu_sources(self) -> None:
        """--distro ubuntu names the ubuntu routes, components and keyring."""
        text = self.snippet("apt-sources", "--distro", "ubuntu", "--suite", "jammy")
        self.assertIn(f"URIs: {SERVER}/ubuntu/\nSuites: jammy jammy-updates\n", text)
        self.assertIn(f"URIs: {SERVER}/ubuntu-security/\nSuites: jammy-security\n", text)
        self.assertIn("Components: main restricted universe multiverse", text)


class PipTests(ClientConfigTestCase):
    def test_read_by_pip(self) -> None:
        """pip, with PIP_CONFIG_FILE on the snippet, takes its index and trusts the host."""
        path = self.write("pip.conf", self.snippet("pip"))
        home = os.path.abspath(self.mktemp())
        env = tool_env(home, PIP_CONFIG_FILE=path, PIP_DISABLE_PIP_VERSION_CHECK="1")
        out = self.run_tool([sys.executable, "-m", "pip", "config", "list"], env)
        self.assertIn(f"global.index-url='{SERVER}/pypi/simple/'", out)
        self.assertIn("global.trusted-host='127.0.0.1:3142'", out)
        debug = self.run_tool([sys.executable, "-m", "pip", "config", "debug"], env)
        self.assertIn(f"{path}, exists: True", debug)

    def test_https_server_needs_no_trust(self) -> None:
        """Behind TLS there is no trusted-host line."""
        result = pkgproxy_config_text("https://cache.example", "pip")
        self.assertNotIn("trusted-host", result.stdout)

    def test_uv(self) -> None:
        """uv.toml names the same simple index as uv's default index; uv reads it so."""
        text = self.snippet("uv")
        data = tomllib.loads(text)
        self.assertEqual(data, {"index": [{"url": f"{SERVER}/pypi/simple/", "default": True}]})
        uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
        if uv is None:
            raise SkipTest("uv is not installed: checked as TOML only")
        path = self.write("uv.toml", text)
        requirements = self.write("requirements.in", "six\n")
        home = os.path.abspath(self.mktemp())
        env = tool_env(home, UV_NO_CACHE="1", UV_OFFLINE="1")
        # --show-settings (hidden, used by uv's own tests) prints what uv resolved from
        # its configuration, without resolving anything.
        argv = [uv, "--config-file", path, "pip", "compile", "--show-settings", requirements]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0 and "--show-settings" in result.stderr:
            raise SkipTest(f"this uv has no --show-settings: {result.stderr.strip()}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f'"{SERVER}/pypi/simple/"', result.stdout)
        self.assertIn("default: true", result.stdout)


class NpmTests(ClientConfigTestCase):
    def test_read_by_npm(self) -> None:
        """npm, with the snippet as its user config, reports pkgproxy as its registry."""
        npm = need("npm")
        path = self.write("npmrc", self.snippet("npm"))
        empty = self.write("globalnpmrc", "")
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        env = tool_env(home)
        out = self.run_tool(
            [npm, "config", "get", "registry", "--userconfig", path, "--globalconfig", empty],
            env,
        )
        self.assertEqual(out.strip(), f"{SERVER}/npm/")


class ContainerTests(ClientConfigTestCase):
    def test_docker(self) -> None:
        """daemon.json names the server root as Docker Hub mirror."""
        self.assertEqual(json.loads(self.snippet("docker")), {"registry-mirrors": [SERVER]})

    def test_containerd_docker_hub(self) -> None:
        """hosts.toml for docker.io: the server root as pull/resolve host of Hub."""
        data = tomllib.loads(self.snippet("containerd"))
        self.assertEqual(data["server"], "https://registry-1.docker.io")
        self.assertEqual(data["host"], {SERVER: {"capabilities": ["pull", "resolve"]}})

    def test_containerd_other_registry(self) -> None:
        """Another registry is reached under /v2/<registry>, which containerd must keep."""
        data = tomllib.loads(self.snippet("containerd", "--registry", "ghcr.io"))
        self.assertEqual(data["server"], "https://ghcr.io")
        host = data["host"][f"{SERVER}/v2/ghcr.io"]
        self.assertEqual((host["capabilities"], host["override_path"]), (["pull", "resolve"], True))


_READ_DNF = """
import sys, dnf
base = dnf.Base()
base.conf.read(sys.argv[1])
base.conf.substitutions["releasever"] = "9"
base.conf.substitutions["basearch"] = "x86_64"
base.conf.reposdir = [sys.argv[2]]
base.read_all_repos()
print(base.conf.proxy)
for r in base.repos.iter_enabled():
    print(r.id, r.metalink or r.mirrorlist, r.gpgcheck, *r.gpgkey)
"""


class DnfTests(ClientConfigTestCase):
    def read_by_dnf(self, *args: str) -> list[str]:
        """The proxy line and the enabled repositories, as dnf's own configuration reader
        (Debian's python3-dnf, the interpreter dnf runs on) takes them from the snippets."""
        need("dnf")
        conf = self.write("dnf.conf", self.snippet("dnf"))
        repos = os.path.dirname(self.write("pkgproxy.repo", self.snippet("dnf-repo", *args)))
        out = self.run_tool(["/usr/bin/python3", "-c", _READ_DNF, conf, repos], clean_env())
        return out.splitlines()

    def test_fedora(self) -> None:
        """Fedora's metalinks on the proxy's fedora-metalink route, signatures checked."""
        metalink = f"{SERVER}/fedora-metalink/metalink?repo="
        key = "file:///etc/pki/rpm-gpg/RPM-GPG-KEY-fedora-9-x86_64"
        self.assertEqual(
            self.read_by_dnf(),
            [
                SERVER,
                f"fedora {metalink}fedora-9&arch=x86_64 True {key}",
                f"updates {metalink}updates-released-f9&arch=x86_64 True {key}",
            ],
        )

    def test_rocky_and_almalinux(self) -> None:
        """Rocky Linux's and AlmaLinux's mirrorlists, as their own repository files name
        them, on the proxy's mirrorlist routes, with their release's signing key."""
        for distro, mirrorlist, names, key in (
            (
                "rocky",
                "rocky-mirrorlist/mirrorlist?arch=x86_64&repo=",
                ("BaseOS-9", "AppStream-9", "extras-9"),
                "Rocky-9",
            ),
            (
                "almalinux",
                "almalinux-mirrorlist/mirrorlist/9/",
                ("baseos", "appstream", "extras"),
                "AlmaLinux-9",
            ),
        ):
            self.assertEqual(
                self.read_by_dnf("--distro", distro)[1:],
                [
                    f"{section} {SERVER}/{mirrorlist}{name} True "
                    f"file:///etc/pki/rpm-gpg/RPM-GPG-KEY-{key}"
                    for section, name in zip(("baseos", "appstream", "extras"), names, strict=True)
                ],
            )

    def test_unknown_distro(self) -> None:
        """A distribution dnf-repo does not know: exit 2 and one line naming those it does."""
        result = pkgproxy_config_text(SERVER, "dnf-repo", "--distro", "debian")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr,
            "pkgproxy-config: dnf-repo: --distro must be one of fedora, rocky, almalinux\n",
        )


class OtherTests(ClientConfigTestCase):
    def test_apk(self) -> None:
        """The repository list points at the alpine route for the chosen release."""
        text = self.snippet("apk", "--alpine-release", "v3.20")
        repos = [line for line in text.splitlines() if line and not line.startswith("#")]
        self.assertEqual(repos, [f"{SERVER}/alpine/v3.20/main", f"{SERVER}/alpine/v3.20/community"])

    def test_all(self) -> None:
        """``all`` prints every tool's file under a heading that names it."""
        out = pkgproxy_config_text(SERVER, "all").stdout
        for path in ("/etc/apt/apt.conf.d/01pkgproxy", "/etc/pip.conf", "~/.npmrc"):
            self.assertIn(f"==> {path} <==", out)

    def test_server_config_prefixes(self) -> None:
        """With --config the server's own route prefixes are used."""
        conf = self.write("pkgproxy.toml", '[routes.npm]\nprefix = "/js/"\n')
        self.assertEqual(
            self.snippet("npm", "--config", conf).splitlines()[-1], f"registry={SERVER}/js/"
        )

    def test_errors(self) -> None:
        """A bad URL, a disabled route or a bad config: exit 2 and one line saying why."""
        for url in ("cache:3142", "http://cache/path", "ftp://cache", "http://u:p@cache"):
            result = pkgproxy_config_text(url, "pip")
            self.assertEqual(result.returncode, 2, url)
            self.assertTrue(result.stderr.startswith("pkgproxy-config: server URL"), result.stderr)
        conf = self.write("pkgproxy.toml", "[routes.pypi]\nenabled = false\n")
        result = pkgproxy_config_text(SERVER, "pip", "--config", conf)
        self.assertEqual(result.returncode, 2)
        self.assertIn("no enabled route named 'pypi'", result.stderr)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(main([SERVER, "pip", "--config", "/nonexistent.toml"]), 2)
        self.assertIn("cannot read config file /nonexistent.toml", err.getvalue())


class CacheReadyEnvTests(ClientConfigTestCase):
    """``examples/pkgproxy-env``, the RUN shell of the cache-ready base images."""

    script = os.path.join(REPO_ROOT, "examples", "pkgproxy-env")

    def run_env(self, command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        home = os.path.abspath(self.mktemp())
        self.tmpdir = os.path.abspath(self.mktemp())
        os.makedirs(self.tmpdir)
        env = tool_env(home, TMPDIR=self.tmpdir, **extra)
        return subprocess.run(
            ["sh", self.script, "sh", "-c", command],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def test_tools_pointed_at_pkgproxy(self) -> None:
        """With PKGPROXY, apt (read back by apt-config), pip, uv and npm name the cache."""
        need("apt-config")
        result = self.run_env(
            "apt-config shell P Acquire::http::Proxy; "
            'echo "$PIP_INDEX_URL|$PIP_TRUSTED_HOST|$UV_DEFAULT_INDEX|$npm_config_registry"',
            PKGPROXY=SERVER + "/",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.splitlines(),
            [
                f"P='{SERVER}/'",
                f"{SERVER}/pypi/simple/|127.0.0.1:3142|{SERVER}/pypi/simple/|{SERVER}/npm/",
            ],
        )

    def test_unset_changes_nothing(self) -> None:
        """Without PKGPROXY the command runs as it is, and its exit status is kept."""
        result = self.run_env('echo "[$PIP_INDEX_URL]"; exit 3')
        self.assertEqual((result.returncode, result.stdout), (3, "[]\n"))

    def test_apk_repositories_restored(self) -> None:
        """apk's repository list points at the alpine route during the command only."""
        original = (
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/main\n"
            "https://dl-cdn.alpinelinux.org/alpine/v3.20/community\n"
        )
        repos = self.write("repositories", original)
        result = self.run_env(
            f"cat {repos}; exit 1", PKGPROXY=SERVER, PKGPROXY_APK_REPOSITORIES=repos
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stdout,
            f"{SERVER}/alpine/v3.20/main\n{SERVER}/alpine/v3.20/community\n",
        )
        with open(repos) as f:
            self.assertEqual(f.read(), original)
        self.assertEqual(os.listdir(self.tmpdir), [])  # no leftover apt.conf or saved list

    def test_bad_value(self) -> None:
        """A PKGPROXY that is not a URL stops the build with a reason."""
        result = self.run_env("true", PKGPROXY="cache:3142")
        self.assertEqual(result.returncode, 2)
        self.assertIn("PKGPROXY must look like", result.stderr)
