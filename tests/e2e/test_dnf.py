"""RPM repositories through a real pkgproxy, fetched by the real ``dnf``.

The upstream is ``python3 -m http.server`` over a repository built by
tests/support/rpmrepo.py (rpmbuild and createrepo_c). dnf runs isolated from the machine:
a fresh ``--installroot`` and ``cachedir`` per run (so every file is asked for again), no
system repositories (``reposdir`` is an empty directory of the test's), no plugins, and
``install --downloadonly`` into a directory of the test's (``dnf download`` needs the
plugins package). By path, ``baseurl`` is the proxy's ``/testrpm/`` prefix; as a proxy,
dnf has ``proxy=`` set and a ``baseurl`` on a host name that only the route's forward
prefix knows, so it can only succeed through pkgproxy.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import subprocess
import time
from collections.abc import Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import rpmrepo
from tests.support.procs import (
    HOST,
    PkgProxy,
    ServerProcess,
    clean_env,
    pkgproxy_config_text,
    start_pkgproxy,
    start_static_server,
)
from tests.support.slowserver import start_slow_server

FORWARD = "http://rpm.pkgproxy.test/repo/"
DNF_TIMEOUT = 120.0
BIG = 6 * 1024 * 1024


def _config(upstream: ServerProcess, ttl: str = "60s") -> str:
    return (
        "[routes.testrpm]\n"
        'family = "rpm"\n'
        'prefix = "/testrpm/"\n'
        f'upstream = "{upstream.url("/repo/")}"\n'
        f'forward = ["{FORWARD}"]\n'
        f'index_ttl = "{ttl}"\n'
    )


class DnfTests(SynchronousTestCase):
    def setUp(self) -> None:
        missing = rpmrepo.missing_tools()
        if missing:
            raise SkipTest(f"needs {', '.join(missing)} (.ci/apt-packages.txt installs them)")
        base = os.path.abspath(self.mktemp())
        self.repo = rpmrepo.build_rpm_repo(
            base,
            [
                rpmrepo.RpmSpec("pkgproxy-hello"),
                rpmrepo.RpmSpec("pkgproxy-extra", "2.1", payload_size=3000),
                rpmrepo.RpmSpec("pkgproxy-big", payload_size=BIG),
            ],
            compress="zstd",  # Fedora's metadata; republished too
        )
        self.upstream = start_static_server(self, self.repo.serve_dir)
        self.runs = 0

    def proxy(self, ttl: str = "60s") -> PkgProxy:
        return start_pkgproxy(self, _config(self.upstream, ttl))

    def dnf_argv(
        self,
        proxy: PkgProxy,
        names: Sequence[str],
        forward: bool = False,
        repo_file: str = "",
        repo_id: str = "t",
    ) -> tuple[list[str], str]:
        """A dnf command line with a fresh root, cache and download directory; ``repo_file``
        (whose repository is ``repo_id``) instead of ``--repofrompath``."""
        self.runs += 1
        work = os.path.abspath(self.mktemp())
        reposdir = os.path.join(work, "repos.d")
        dest = os.path.join(work, "dest")
        for d in (reposdir, dest, os.path.join(work, "root")):
            os.makedirs(d)
        self.addCleanup(rpmrepo.stop_gpg_agents, os.path.join(work, "cache"))
        argv = [
            "dnf", "-y", "-q", "--noplugins",
            f"--installroot={work}/root", "--releasever=1",
            f"--setopt=reposdir={reposdir}", f"--setopt=cachedir={work}/cache",
            "--setopt=install_weak_deps=0", "--nogpgcheck",
            # The packages are not signed; repomd.xml is, and dnf checks its .asc.
            f"--setopt={repo_id}.repo_gpgcheck=1",
            f"--setopt={repo_id}.gpgkey=file://{self.repo.public_key}",
        ]  # fmt: skip
        if repo_file:
            with open(os.path.join(reposdir, "t.repo"), "w", encoding="utf-8") as f:
                f.write(repo_file)
        else:
            base = FORWARD if forward else proxy.url("/testrpm/")
            argv += [f"--repofrompath=t,{base}", "--repo=t"]
        if forward:
            argv.append(f"--setopt=proxy=http://{HOST}:{proxy.port}")
        argv += ["install", "--downloadonly", "--downloaddir", dest, *names]
        return argv, dest

    def dnf(self, proxy: PkgProxy, *names: str, forward: bool = False, ok: bool = True) -> str:
        """Run dnf to download ``names``; return the download directory."""
        argv, dest = self.dnf_argv(proxy, names, forward)
        done = subprocess.run(
            argv, capture_output=True, timeout=DNF_TIMEOUT, env=clean_env(), check=False
        )
        report = (
            f"$ {' '.join(argv)}\nexit {done.returncode}\n{done.stdout.decode(errors='replace')}"
            f"{done.stderr.decode(errors='replace')}\n{proxy.logs()}"
        )
        if ok:
            self.assertEqual(done.returncode, 0, report)
            for name in names:
                self.assertEqual(self.downloaded(dest, name), self.repo.package(name).data())
        else:
            self.assertNotEqual(done.returncode, 0, report)
        return dest

    def downloaded(self, dest: str, name: str) -> bytes:
        with open(os.path.join(dest, self.repo.package(name).basename), "rb") as f:
            return f.read()

    def origin_gets(self, path: str, root: str = "/repo/") -> int:
        """How many times the upstream was asked for ``path`` (below ``root``)."""
        with open(self.upstream.log_path, encoding="utf-8", errors="replace") as f:
            return f.read().count(f'"GET {root}{path} ')

    def get(self, proxy: PkgProxy, path: str, prefix: str = "/testrpm/") -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection(HOST, proxy.port, timeout=20)
        try:
            conn.request("GET", f"{prefix}{path}")
            resp = conn.getresponse()
            try:
                body = resp.read()
            except http.client.IncompleteRead as e:
                body = e.partial
                return -1, body, ""
            return resp.status, body, resp.getheader("X-Cache", "")
        except (OSError, http.client.HTTPException):
            return -1, b"", ""
        finally:
            conn.close()

    def _cold_warm_offline(self, forward: bool) -> None:
        proxy = self.proxy()
        hello = self.repo.package("pkgproxy-hello")
        self.dnf(proxy, "pkgproxy-hello", "pkgproxy-extra", forward=forward)
        self.assertEqual(self.origin_gets(hello.path), 1)
        proxy.wait_for_entries(5)
        self.dnf(proxy, "pkgproxy-hello", "pkgproxy-extra", forward=forward)
        self.assertEqual(self.origin_gets(hello.path), 1)
        self.assertEqual(self.origin_gets("repodata/repomd.xml"), 1)
        self.upstream.stop()
        self.dnf(proxy, "pkgproxy-hello", "pkgproxy-extra", forward=forward)

    def test_by_path_cold_warm_offline(self) -> None:
        """``baseurl=http://cache/testrpm/``: cold from upstream, warm and offline from
        the cache, each file fetched upstream once."""
        self._cold_warm_offline(forward=False)

    def test_as_proxy_cold_warm_offline(self) -> None:
        """``proxy=http://cache`` with the mirror's own http:// baseurl: the same."""
        self._cold_warm_offline(forward=True)

    def test_republished_seen_within_ttl(self) -> None:
        """A package published after the cache has the repository is seen once the
        repomd.xml's TTL has passed; the old revision is never served back."""
        proxy = self.proxy(ttl="1s")
        self.dnf(proxy, "pkgproxy-hello")
        rpmrepo.republish(self.repo, [rpmrepo.RpmSpec("pkgproxy-new", "3.0")])
        time.sleep(1.5)
        self.dnf(proxy, "pkgproxy-new")
        status, body, _ = self.get(proxy, "repodata/repomd.xml")
        self.assertEqual(status, 200)
        self.assertIn(f"<revision>{self.repo.revision}</revision>".encode(), body)

    def test_lagging_mirror_never_takes_the_cache_back(self) -> None:
        """A mirror that serves an older repomd.xml (smaller revision) and its signature
        after a newer one was cached: the cache keeps the newer pair, and dnf still
        finds the newer package and checks the signature."""
        proxy = self.proxy(ttl="1s")
        repodata = os.path.join(self.repo.root, "repodata")
        old = {}
        for name in ("repomd.xml", "repomd.xml.asc"):
            with open(os.path.join(repodata, name), "rb") as f:
                old[name] = f.read()
        rpmrepo.republish(self.repo, [rpmrepo.RpmSpec("pkgproxy-new", "3.0")])
        self.dnf(proxy, "pkgproxy-new")
        time.sleep(1.1)  # the lagging copy must be written in a later second, too
        for name, data in old.items():
            with open(os.path.join(repodata, name), "wb") as f:
                f.write(data)
        time.sleep(1.5)
        self.dnf(proxy, "pkgproxy-new")
        status, body, _ = self.get(proxy, "repodata/repomd.xml")
        self.assertEqual(status, 200)
        self.assertIn(f"<revision>{self.repo.revision}</revision>".encode(), body)
        self.assertGreater(self.origin_gets("repodata/repomd.xml"), 1)

    def test_corrupted_rpm_refused_and_not_stored(self) -> None:
        """An rpm whose bytes disagree with primary's checksum is refused and not stored;
        once the mirror has the right bytes again, they are fetched and served."""
        proxy = self.proxy()
        self.dnf(proxy, "pkgproxy-hello")
        extra = self.repo.package("pkgproxy-extra")
        good = extra.data()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        with open(extra.local, "wb") as f:
            f.write(bad)
        status, body, _ = self.get(proxy, extra.path)
        self.assertFalse(status == 200 and body == bytes(bad), "the corrupt rpm was served whole")
        self.dnf(proxy, "pkgproxy-extra", ok=False)
        with open(extra.local, "wb") as f:
            f.write(good)
        self.dnf(proxy, "pkgproxy-extra")
        status, body, x_cache = self.get(proxy, extra.path)
        self.assertEqual((status, body), (200, good))
        self.assertIn("HIT", x_cache)

    def test_stampede_on_large_rpm_is_one_origin_fetch(self) -> None:
        """Ten dnf clients at once on one large rpm that the upstream sends slowly (about
        4 s): one upstream fetch, which all ten are streamed, and ten good copies."""
        slow = start_slow_server(self, self.repo.serve_dir, rate=1_500_000)
        proxy = start_pkgproxy(self, _config(slow))
        self.dnf(proxy, "pkgproxy-hello")
        runs = [self.dnf_argv(proxy, ["pkgproxy-big"]) for _ in range(10)]
        procs = [
            subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env()
            )
            for argv, _ in runs
        ]
        outputs = [p.communicate(timeout=DNF_TIMEOUT)[0] for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            self.assertEqual(p.returncode, 0, out.decode(errors="replace") + proxy.logs())
        big = self.repo.package("pkgproxy-big")
        want = big.data()
        for _, dest in runs:
            self.assertEqual(self.downloaded(dest, "pkgproxy-big"), want)
        self.assertEqual(slow.requests(f"/repo/{big.path}"), 1, slow.logs())
        with open(proxy.log_path, encoding="utf-8") as f:
            answers = [line for line in f if f"GET /testrpm/{big.path}" in line]
        self.assertEqual(len(answers), 10, "".join(answers))
        joined = [line for line in answers if " HIT " not in line]
        self.assertGreater(len(joined), 1, "no client joined the download:\n" + "".join(answers))

    def _metalink_config(self) -> str:
        """Fedora's built-in routes, on the test's upstream: the repository as the
        ``fedora`` route, MirrorManager's ``/metalink`` as ``fedora-metalink``."""
        with open(os.path.join(self.repo.root, "repodata", "repomd.xml"), "rb") as f:
            repomd = f.read()
        mirror = "http://mirror.example.test/pub/fedora/linux/repodata/repomd.xml"
        metalink = f"""<?xml version="1.0" encoding="utf-8"?>
<metalink version="3.0" xmlns="http://www.metalinker.org/" type="dynamic"
  generator="mirrormanager" xmlns:mm0="http://fedorahosted.org/mirrormanager">
 <files>
  <file name="repomd.xml">
   <mm0:timestamp>{self.repo.revision}</mm0:timestamp>
   <size>{len(repomd)}</size>
   <verification>
    <hash type="md5">{hashlib.md5(repomd).hexdigest()}</hash>
    <hash type="sha256">{hashlib.sha256(repomd).hexdigest()}</hash>
   </verification>
   <resources maxconnections="1">
    <url protocol="http" type="http" location="DE" preference="100">{mirror}</url>
   </resources>
  </file>
 </files>
</metalink>
"""
        with open(os.path.join(self.repo.serve_dir, "metalink"), "w", encoding="utf-8") as f:
            f.write(metalink)
        return (
            f'[routes.fedora]\nupstream = "{self.upstream.url("/repo/")}"\n'
            f'[routes.fedora-metalink]\nupstream = "{self.upstream.url("/")}"\n'
        )

    def _cold_then_offline(
        self,
        proxy: PkgProxy,
        repo_file: str,
        forward: bool = False,
        root: str = "/repo/",
        repo_id: str = "t",
    ) -> rpmrepo.BuiltRpm:
        """dnf downloads pkgproxy-hello through ``proxy`` with ``repo_file``, cold and then
        with the upstream stopped: the origin is asked for the rpm once, and six entries
        are stored (the mirror answer, repomd.xml and .asc, primary, filelists, the rpm).
        ``root``: where the upstream serves the repository. The package, for the caller's
        further checks."""
        want = self.repo.package("pkgproxy-hello")
        for _ in ("cold", "offline"):
            argv, dest = self.dnf_argv(
                proxy, ["pkgproxy-hello"], forward, repo_file=repo_file, repo_id=repo_id
            )
            done = subprocess.run(
                argv, capture_output=True, timeout=DNF_TIMEOUT, env=clean_env(), check=False
            )
            self.assertEqual(
                done.returncode, 0, done.stdout.decode() + done.stderr.decode() + proxy.logs()
            )
            self.assertEqual(self.downloaded(dest, "pkgproxy-hello"), want.data())
            self.assertEqual(self.origin_gets(want.path, root), 1)
            proxy.wait_for_entries(6)
            self.upstream.stop()
        return want

    def _metalink(self, forward: bool) -> None:
        proxy = start_pkgproxy(self, self._metalink_config())
        query = "metalink?repo=fedora-1&arch=noarch"
        where = (
            f"http://mirrors.fedoraproject.org/{query}"
            if forward
            else proxy.url(f"/fedora-metalink/{query}")
        )
        repo_file = f"[t]\nname=t\nmetalink={where}\ngpgcheck=0\n"
        self._cold_then_offline(proxy, repo_file, forward)

    def test_metalink_by_path(self) -> None:
        """``metalink=http://cache/fedora-metalink/metalink?repo=...``: the answer names
        the proxy's Fedora route, and dnf's check of repomd.xml against the upstream
        metalink's checksums passes; then again with the upstream stopped."""
        self._metalink(forward=False)

    def test_metalink_as_proxy(self) -> None:
        """A stock ``metalink=http://mirrors.fedoraproject.org/...`` with ``proxy=``."""
        self._metalink(forward=True)

    def _mirrorlist(self, forward: bool) -> None:
        """The upstream's answer lists, after comments, a mirror nothing serves and then
        one whose ``/pub/rocky/`` tree is the built-in ``rocky`` route's (both on a closed
        port, so dnf gets nothing from them itself); the proxy answers with that route
        alone, and dnf downloads through it. Then again with the upstream stopped."""
        mirrorlist = (
            "# repo = rocky-BaseOS-1 arch = noarch country = XX\n\n"
            f"http://{HOST}:1/rocky-unserved/1/BaseOS/noarch/os/\n"
            "# the next mirror names Rocky's tree\n"
            f"http://{HOST}:1/pub/rocky/\n"
        )
        with open(os.path.join(self.repo.serve_dir, "mirrorlist"), "w", encoding="utf-8") as f:
            f.write(mirrorlist)
        proxy = start_pkgproxy(
            self,
            f'[routes.rocky]\nupstream = "{self.upstream.url("/repo/")}"\n'
            f'[routes.rocky-mirrorlist]\nupstream = "{self.upstream.url("/")}"\n',
        )
        query = "mirrorlist?arch=$basearch&repo=BaseOS-$releasever"
        where = (
            f"http://mirrors.rockylinux.org/{query}"
            if forward
            else proxy.url(f"/rocky-mirrorlist/{query}")
        )
        repo_file = f"[t]\nname=t\nmirrorlist={where}\ngpgcheck=0\n"
        want = self._cold_then_offline(proxy, repo_file, forward)
        with open(proxy.log_path, encoding="utf-8") as f:
            log = f.read()
        asked = re.findall(r'"GET \S*?(mirrorlist\?arch=\S+&repo=BaseOS-1)"', log)
        self.assertGreaterEqual(len(asked), 2, log)  # each run asks (libdnf: more than once)
        # dnf was told the proxy's route alone: by path, its URL; as an HTTP proxy, its
        # forward prefix (Rocky's master host), which dnf then asked through the proxy.
        master = "http://dl.rockylinux.org/pub/rocky/"
        rpm_url = f"{master}{want.path}" if forward else f"/rocky/{want.path}"
        self.assertEqual(log.count(f'"GET {rpm_url}"'), 2, log)
        with open(self.upstream.log_path, encoding="utf-8", errors="replace") as f:
            self.assertEqual(f.read().count('"GET /mirrorlist?'), 1)
        if not forward:
            status, body, x_cache = self.get(proxy, asked[0], prefix="/rocky-mirrorlist/")
            self.assertEqual((status, body.decode()), (200, proxy.url("/rocky/") + "\n"))
            self.assertIn("HIT", x_cache)

    def test_mirrorlist_by_path(self) -> None:
        """``mirrorlist=http://cache/rocky-mirrorlist/mirrorlist?arch=...&repo=...``."""
        self._mirrorlist(forward=False)

    def test_mirrorlist_as_proxy(self) -> None:
        """A stock ``mirrorlist=http://mirrors.rockylinux.org/...`` with ``proxy=``: the
        answer names Rocky's master host, which dnf then asks through the proxy."""
        self._mirrorlist(forward=True)

    def _release_tree(self, top: str) -> str:
        """The repository also served as ``<top>/1/BaseOS/<basearch>/os/`` (release 1, as
        dnf runs here), the layout of Rocky's and AlmaLinux's trees; dnf's basearch."""
        arch = subprocess.run(
            ["/usr/bin/python3", "-c", "import dnf; print(dnf.Base().conf.basearch)"],
            capture_output=True, text=True, timeout=60, env=clean_env(), check=True,
        ).stdout.strip()  # fmt: skip
        tree = os.path.join(self.repo.serve_dir, top, "1", "BaseOS", arch)
        os.makedirs(tree)
        os.symlink(self.repo.root, os.path.join(tree, "os"))
        return arch

    def test_mirrorlist_mirror_with_the_tree_at_its_root(self) -> None:
        """Rocky's mirrorlist service (``rocky-mirrorlist`` on its own host name, reached
        through an outbound proxy that holds a copy of it) lists only a mirror that keeps
        the release tree at the root of its host: the answer is the ``rocky`` route's
        same tree, and dnf downloads through it, cold and then offline."""
        arch = self._release_tree("rocky")
        mirrors = os.path.abspath(self.mktemp())
        os.makedirs(mirrors)
        with open(os.path.join(mirrors, "mirrorlist"), "w", encoding="utf-8") as f:
            f.write(f"# repo = rocky-BaseOS-1\nhttp://{HOST}:1/1/BaseOS/{arch}/os/\n")
        # It answers an absolute-form request from its root, whatever the host.
        outbound = start_slow_server(self, mirrors, rate=50_000_000)
        proxy = start_pkgproxy(
            self,
            f'[upstream]\nproxy = "{outbound.url("/")}"\nno_proxy = ["{HOST}"]\n'
            f'[routes.rocky]\nupstream = "{self.upstream.url("/rocky/")}"\n'
            '[routes.rocky-mirrorlist]\nupstream = "http://mirrors.rockylinux.org/"\n',
        )
        query = "mirrorlist?arch=$basearch&repo=BaseOS-$releasever"
        repo_file = (
            f"[t]\nname=t\nmirrorlist={proxy.url(f'/rocky-mirrorlist/{query}')}\ngpgcheck=0\n"
        )
        want = self._cold_then_offline(proxy, repo_file, root=f"/rocky/1/BaseOS/{arch}/os/")
        asked = f"http://mirrors.rockylinux.org/mirrorlist?arch={arch}&repo=BaseOS-1"
        self.assertEqual(outbound.requests(asked), 1, outbound.logs())
        with open(proxy.log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertEqual(log.count(f'"GET /rocky/1/BaseOS/{arch}/os/{want.path}"'), 2, log)

    def test_almalinux_mirrorlist_by_path(self) -> None:
        """AlmaLinux's ``mirrorlist=http://cache/almalinux-mirrorlist/mirrorlist/$releasever/
        baseos``: its mirrors' URLs keep a literal ``$basearch``, kept in the answer for dnf
        to fill in; the mirror's ``/almalinux/`` tree is the built-in ``almalinux`` route's.
        Cold, then with the upstream stopped."""
        arch = self._release_tree("alma")
        os.makedirs(os.path.join(self.repo.serve_dir, "mirrorlist", "1"))
        with open(
            os.path.join(self.repo.serve_dir, "mirrorlist", "1", "baseos"), "w", encoding="utf-8"
        ) as f:
            f.write(f"http://{HOST}:1/almalinux/1/BaseOS/$basearch/os/\n")
        proxy = start_pkgproxy(
            self,
            f'[routes.almalinux]\nupstream = "{self.upstream.url("/alma/")}"\n'
            f'[routes.almalinux-mirrorlist]\nupstream = "{self.upstream.url("/")}"\n',
        )
        where = proxy.url("/almalinux-mirrorlist/mirrorlist/$releasever/baseos")
        repo_file = f"[t]\nname=t\nmirrorlist={where}\ngpgcheck=0\n"
        want = self._cold_then_offline(proxy, repo_file, root=f"/alma/1/BaseOS/{arch}/os/")
        with open(proxy.log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertEqual(log.count(f'"GET /almalinux/1/BaseOS/{arch}/os/{want.path}"'), 2, log)
        status, body, x_cache = self.get(proxy, "mirrorlist/1/baseos", "/almalinux-mirrorlist/")
        self.assertEqual(
            (status, body.decode()), (200, proxy.url("/almalinux/1/BaseOS/$basearch/os/") + "\n")
        )
        self.assertIn("HIT", x_cache)

    def _snippet(self, proxy: PkgProxy, distro: str) -> str:
        """The first repository of ``pkgproxy-config dnf-repo --distro <distro>``, as the
        program prints it for this server and its configuration."""
        done = pkgproxy_config_text(
            "-c", proxy.config_path, "--distro", distro, proxy.url("/").rstrip("/"), "dnf-repo"
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        first, _, _ = done.stdout.partition("\n\n[")
        self.assertIn(proxy.url("/"), first)
        return first + "\n"

    def test_dnf_repo_snippets_drive_dnf_through_the_server(self) -> None:
        """What ``pkgproxy-config dnf-repo`` prints for Fedora, Rocky Linux and AlmaLinux,
        its first repository put in dnf's repository directory as printed (dnf fills in
        ``$releasever`` and ``$basearch``; the packages here are not signed, so dnf runs
        with ``--nogpgcheck`` and the test's key for repomd.xml): dnf downloads through
        the server, cold and then with the upstream stopped."""
        arch = self._release_tree("rocky")
        serve = self.repo.serve_dir
        os.symlink(os.path.join(serve, "rocky"), os.path.join(serve, "alma"))
        with open(os.path.join(serve, "mirrorlist"), "w", encoding="utf-8") as f:
            f.write(f"http://{HOST}:1/pub/rocky/1/BaseOS/{arch}/os/\n")
        alma_list = os.path.join(serve, "alma-mirrors", "mirrorlist", "1")
        os.makedirs(alma_list)
        with open(os.path.join(alma_list, "baseos"), "w", encoding="utf-8") as f:
            f.write(f"http://{HOST}:1/almalinux/1/BaseOS/$basearch/os/\n")
        for distro, repo_id in (("fedora", "fedora"), ("rocky", "baseos"), ("almalinux", "baseos")):
            with self.subTest(distro):
                self.upstream = start_static_server(self, serve)
                if distro == "fedora":
                    config, root = self._metalink_config(), "/repo/"
                else:
                    tree, mirrors = (
                        ("/rocky/", "/") if distro == "rocky" else ("/alma/", "/alma-mirrors/")
                    )
                    config = (
                        f'[routes.{distro}]\nupstream = "{self.upstream.url(tree)}"\n'
                        f'[routes.{distro}-mirrorlist]\nupstream = "{self.upstream.url(mirrors)}"\n'
                    )
                    root = f"{tree}1/BaseOS/{arch}/os/"
                proxy = start_pkgproxy(self, config)
                snippet = self._snippet(proxy, distro)
                self.assertIn(f"[{repo_id}]\n", snippet)
                self._cold_then_offline(proxy, snippet, root=root, repo_id=repo_id)
