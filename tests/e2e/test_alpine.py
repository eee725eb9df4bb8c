"""Alpine (apk) repositories through a real pkgproxy, fetched the way apk fetches them.

Why this test exists: Debian 12 has no ``apk``, so curl stands in for it. apk (libfetch)
honours ``http_proxy`` and then sends absolute URIs, so curl runs with ``http_proxy`` set
to pkgproxy and asks for ``http://dl-cdn.alpinelinux.org/alpine/...``: forward mode, which
the built-in route maps onto the test's upstream. The upstream is ``python3 -m
http.server`` over an Alpine-shaped tree written by tests/support/alpinerepo.py: an
``APKINDEX.tar.gz`` of two gzip streams and ``.apk`` files of three, with ``S:`` and ``C:``
records. pkgproxy reads the index when it caches it and must then refuse, and never store,
a package whose size or control checksum disagrees with it (PROTOCOLS.md section 3.4).

"Refuse" means: the client never gets a clean, complete download of the wrong bytes.
Either it gets a 502 before any body (the upstream's Content-Length already contradicts
``S:``), or its transfer is cut short (the ``C:`` check can only run at the end, so the
proxy holds back the last byte until it has).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import itertools
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support import alpinerepo
from tests.support.procs import (
    HOST,
    PkgProxy,
    StaticServer,
    clean_env,
    start_pkgproxy,
    start_static_server,
)

FORWARD_BASE = "http://dl-cdn.alpinelinux.org/alpine/"
CURL_TIMEOUT = 20.0
WAIT_TIMEOUT = 10.0
_CURL_RUNS = itertools.count()


@dataclass(frozen=True)
class CurlResult:
    """One curl run: exit status, the HTTP status and headers it saw, the bytes it saved."""

    args: tuple[str, ...]
    returncode: int
    status: int  # 0 when no status line arrived
    headers: dict[str, str]  # lower-case names, last response only
    body: bytes
    stderr: str
    timed_out: bool = False

    @property
    def x_cache(self) -> str:
        """pkgproxy's ``X-Cache`` verdict, or ``""``."""
        return self.headers.get("x-cache", "")

    @property
    def clean_200(self) -> bool:
        """curl reported a complete, successful 200 transfer."""
        return not self.timed_out and self.returncode == 0 and self.status == 200

    def report(self) -> str:
        """A readable account, for assertion messages."""
        return (
            f"$ {' '.join(self.args)}\nexit {self.returncode}"
            f"{' (timed out)' if self.timed_out else ''}, HTTP {self.status}, "
            f"{len(self.body)} bytes, headers {self.headers}\nstderr: {self.stderr}"
        )


def curl(
    work_dir: str,
    url: str,
    *,
    proxy: str | None = None,
    headers: Sequence[str] = (),
) -> CurlResult:
    """GET ``url`` with curl; ``proxy`` goes into ``http_proxy`` (forward mode, as apk does).

    The environment is otherwise free of proxy variables and ``-q`` skips any ``.curlrc``.
    Bounded twice: curl's own ``--max-time`` and the subprocess timeout.
    """
    os.makedirs(work_dir, exist_ok=True)
    n = next(_CURL_RUNS)
    head_path = os.path.join(work_dir, f"{n}.headers")
    body_path = os.path.join(work_dir, f"{n}.body")
    args = ["curl", "-q", "-sS", "--max-time", str(CURL_TIMEOUT), "-D", head_path]
    args += ["-o", body_path, "-w", "%{http_code}"]
    for h in headers:
        args += ["-H", h]
    args.append(url)
    env = clean_env({"http_proxy": proxy} if proxy else None)
    timed_out = False
    try:
        proc = subprocess.run(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CURL_TIMEOUT + 10,
            check=False,
        )
        returncode, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        timed_out, returncode = True, -1
        out, err = e.stdout or b"", e.stderr or b""
    body = b""
    if os.path.exists(body_path):
        with open(body_path, "rb") as f:
            body = f.read()
    parsed: dict[str, str] = {}
    if os.path.exists(head_path):
        with open(head_path, "rb") as f:
            for line in f.read().decode("latin-1").splitlines():
                if line.startswith("HTTP/"):
                    parsed = {}  # a new response (never more than one here)
                elif ":" in line:
                    k, _, v = line.partition(":")
                    parsed[k.strip().lower()] = v.strip()
    code = out.decode("ascii", "replace").strip()
    return CurlResult(
        tuple(args),
        returncode,
        int(code) if code.isdigit() else 0,
        parsed,
        body,
        err.decode("utf-8", "replace"),
        timed_out,
    )


def upstream_gets(server: StaticServer, path: str) -> int:
    """How many times the static server logged a GET of ``path`` (exact path)."""
    try:
        with open(server.log_path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if f'"GET {path} HTTP/' in line)
    except FileNotFoundError:
        return 0


def config(upstream: StaticServer, mount: str = "alpine") -> str:
    """The route of the brief: the built-in ``alpine`` route, upstream on the test server."""
    return (
        "[routes.alpine]\n"
        f'upstream = "{upstream.url(f"/{mount}/")}"\n'
        f'forward = ["{FORWARD_BASE}"]\n'
    )


class FixtureTests(SynchronousTestCase):
    """The fixture is what the e2e tests claim it is (checked without pkgproxy's code)."""

    def test_tree_has_the_abuild_shape(self) -> None:
        """Each .apk is three gzip streams that together untar to signature, .PKGINFO and
        data; its record's S: is its size and C: the SHA-1 of its second stream; the index
        is two gzip streams (with or without end-of-archive blocks after the signature)."""
        for end_marker in (False, True):
            repo = alpinerepo.build_alpine_repo(self.mktemp(), signature_end_marker=end_marker)
            records = [r for r in repo.apkindex_text.split("\n\n") if r.strip()]
            self.assertEqual(len(records), len(repo.packages))
            for pkg, record in zip(repo.packages, records, strict=True):
                members = alpinerepo.gzip_members(pkg.data)
                self.assertEqual(len(members), 3)
                self.assertIn(f"S:{len(pkg.data)}\n", record)
                self.assertIn(f"C:{alpinerepo.apk_checksum(members[1])}\n", record)
                self.assertIn(f"P:{pkg.name}\nV:{pkg.version}\nA:{repo.arch}\n", record)
                with tarfile.open(fileobj=io.BytesIO(gzip.decompress(pkg.data))) as tar:
                    names = tar.getnames()
                self.assertEqual(names[:2], [f".SIGN.RSA.{alpinerepo.KEY_NAME}", ".PKGINFO"])
            self.assertEqual(len(alpinerepo.gzip_members(repo.index)), 2)
            with tarfile.open(
                fileobj=io.BytesIO(gzip.decompress(repo.index)), ignore_zeros=True
            ) as tar:
                names = tar.getnames()
                member = tar.extractfile("APKINDEX")
                assert member is not None
                text = member.read().decode()
            self.assertEqual(names, [f".SIGN.RSA.{alpinerepo.KEY_NAME}", "DESCRIPTION", "APKINDEX"])
            self.assertEqual(text, repo.apkindex_text)

    def test_lying_packages(self) -> None:
        """``size_mismatch`` serves other-sized bytes with an intact C:; ``checksum_mismatch``
        serves exactly S: bytes whose control stream hashes to something else."""
        repo = alpinerepo.build_alpine_repo(
            self.mktemp(), size_mismatch=["pkgproxy-hello"], checksum_mismatch=["pkgproxy-extra"]
        )
        hello, extra = repo.package("pkgproxy-hello"), repo.package("pkgproxy-extra")
        self.assertNotEqual(len(hello.data), hello.size)
        self.assertEqual(
            alpinerepo.apk_checksum(alpinerepo.gzip_members(hello.data)[1]), hello.checksum
        )
        self.assertEqual(len(extra.data), extra.size)
        self.assertNotEqual(
            alpinerepo.apk_checksum(alpinerepo.gzip_members(extra.data)[1]), extra.checksum
        )


class AlpineCase(TestCase):
    """Shared set-up: build a tree, serve it, start pkgproxy on it."""

    size_mismatch: tuple[str, ...] = ()
    checksum_mismatch: tuple[str, ...] = ()
    signature_end_marker = False

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            raise SkipTest("needs curl (Debian package listed in .ci/apt-packages.txt)")
        self.repo = alpinerepo.build_alpine_repo(
            self.mktemp(),
            size_mismatch=self.size_mismatch,
            checksum_mismatch=self.checksum_mismatch,
            signature_end_marker=self.signature_end_marker,
        )
        self.upstream = start_static_server(self, self.repo.serve_dir)
        # --log-level debug: the tests wait for the line saying the index was read.
        self.proxy: PkgProxy = start_pkgproxy(
            self, config(self.upstream, self.repo.mount), args=["--log-level", "debug"]
        )
        self.proxy_url = self.proxy.url("/")
        self.curl_dir = os.path.abspath(self.mktemp())

    # -- helpers ------------------------------------------------------------------------

    def _context(self) -> str:
        return f"{self.proxy.logs()}\n{self.upstream.logs()}"

    def forward(self, rel: str, headers: Sequence[str] = ()) -> CurlResult:
        """curl ``http://dl-cdn.alpinelinux.org/alpine/<rel>`` with ``http_proxy`` = pkgproxy."""
        return curl(self.curl_dir, FORWARD_BASE + rel, proxy=self.proxy_url, headers=headers)

    def reverse(self, rel: str, headers: Sequence[str] = ()) -> CurlResult:
        """curl ``http://127.0.0.1:PORT/alpine/<rel>`` directly (reverse mode)."""
        return curl(self.curl_dir, self.proxy.url(f"/alpine/{rel}"), headers=headers)

    def upstream_path(self, rel: str) -> str:
        """The path pkgproxy requests from the static server for ``rel``."""
        return f"/{self.repo.mount}/{rel}"

    def assert_body(self, result: CurlResult, want: bytes, what: str) -> None:
        """A clean 200 whose bytes are exactly ``want``."""
        if not result.clean_200:
            self.fail(f"{what}: not a clean 200\n{result.report()}\n{self._context()}")
        self.assertEqual(
            hashlib.sha256(result.body).hexdigest(),
            hashlib.sha256(want).hexdigest(),
            f"{what}: wrong bytes ({len(result.body)} of {len(want)})\n{self._context()}",
        )

    def _learned_count(self) -> int:
        needle = f"learned {len(self.repo.packages)} entries from alpine:{self.repo.index_path}"
        try:
            with open(self.proxy.log_path, encoding="utf-8", errors="replace") as f:
                return f.read().count(needle)
        except FileNotFoundError:
            return 0

    def fetch_index_and_wait_learned(self) -> CurlResult:
        """Fetch APKINDEX.tar.gz (forward) and wait until pkgproxy has read it.

        The client has its last byte before pkgproxy commits and parses the index (in its
        disk threads), so a package asked for at once could slip past the checks; see
        :class:`IndexRaceTests`. The only outside sign of the parse is pkgproxy's
        ``learned N entries from <key>`` log line. Bounded: fails after 10 s.
        """
        before = self._learned_count()
        result = self.forward(self.repo.index_path)
        self.assert_body(result, self.repo.index, "APKINDEX.tar.gz")
        deadline = time.monotonic() + WAIT_TIMEOUT
        while self._learned_count() <= before:
            if time.monotonic() > deadline:
                self.fail(f"pkgproxy never logged reading the index\n{self._context()}")
            time.sleep(0.05)
        return result

    def wait_until_hit(self, rel: str) -> CurlResult:
        """GET ``rel`` (forward) until it is answered from disk; bounded to 10 s.

        Between a client's last byte and the commit, a request joins the settling fetch
        (``COALESCED``); neither asks upstream again.
        """
        result = None
        deadline = time.monotonic() + WAIT_TIMEOUT
        while time.monotonic() < deadline:
            result = self.forward(rel)
            if result.clean_200 and result.x_cache == "HIT":
                return result
            time.sleep(0.05)
        assert result is not None
        self.fail(f"{rel} never became a cache HIT\n{result.report()}\n{self._context()}")

    def assert_refused_and_not_stored(self, pkg: alpinerepo.BuiltApk) -> None:
        """Two GETs of a lying package: neither is a clean complete download of its bytes,
        neither comes from the cache, and each goes to the upstream."""
        before = upstream_gets(self.upstream, self.upstream_path(pkg.path))
        for attempt in (1, 2):
            result = self.forward(pkg.path)
            what = f"{pkg.basename} ({pkg.lies} disagrees with the index), attempt {attempt}"
            self.assertFalse(result.timed_out, f"{what}\n{result.report()}")
            self.assertFalse(
                result.clean_200,
                f"{what}: served as a clean 200\n{result.report()}\n{self._context()}",
            )
            self.assertNotEqual(result.body, pkg.data, f"{what}: the wrong bytes, complete")
            if result.returncode == 0:
                # curl completed a response: then it must be an error status, not the file.
                self.assertEqual(result.status, 502, f"{what}\n{result.report()}")
            self.assertNotIn(result.x_cache, ("HIT", "STALE"), f"{what}\n{result.report()}")
            self.assertEqual(
                upstream_gets(self.upstream, self.upstream_path(pkg.path)),
                before + attempt,
                f"{what}: not fetched from upstream again\n{self._context()}",
            )


class AlpineForwardTests(AlpineCase):
    """The index and packages through ``http_proxy``, then from the cache alone."""

    def test_fetch_then_serve_offline(self) -> None:
        """APKINDEX.tar.gz and every .apk arrive byte-exact through the proxy; with the
        upstream stopped, every one of them is served again, byte-exact, as a HIT."""
        first = self.fetch_index_and_wait_learned()
        self.assertEqual(first.x_cache, "MISS", first.report())
        for pkg in self.repo.packages:
            result = self.forward(pkg.path)
            self.assert_body(result, pkg.data, pkg.basename)
            self.assertEqual(result.x_cache, "MISS", result.report())
        for rel in self.repo.files():
            self.wait_until_hit(rel)
        counts = {
            rel: upstream_gets(self.upstream, self.upstream_path(rel)) for rel in self.repo.files()
        }
        self.assertEqual(set(counts.values()), {1}, f"upstream GETs per file: {counts}")

        self.upstream.stop()
        for rel, data in self.repo.files().items():
            result = self.forward(rel)
            self.assert_body(result, data, f"{rel} (upstream stopped)")
            self.assertEqual(result.x_cache, "HIT", result.report())

    def test_reverse_path_shares_the_cache(self) -> None:
        """``/alpine/<branch>/...`` on pkgproxy serves the same bytes, and the same cache
        entries, as the forward URIs: a file fetched one way is a HIT the other way."""
        index = self.reverse(self.repo.index_path)
        self.assert_body(index, self.repo.index, "APKINDEX.tar.gz (reverse)")
        self.assertEqual(index.x_cache, "MISS", index.report())
        pkg = self.repo.package("pkgproxy-blob")
        result = self.reverse(pkg.path)
        self.assert_body(result, pkg.data, f"{pkg.basename} (reverse)")

        for rel in (self.repo.index_path, pkg.path):
            hit = self.wait_until_hit(rel)  # forward URIs
            self.assert_body(hit, self.repo.files()[rel], f"{rel} (forward after reverse)")
            self.assertEqual(upstream_gets(self.upstream, self.upstream_path(rel)), 1, rel)
        again = self.reverse(pkg.path)
        self.assert_body(again, pkg.data, f"{pkg.basename} (reverse, cached)")
        self.assertEqual(again.x_cache, "HIT", again.report())

    def test_if_modified_since_gets_304_from_cache(self) -> None:
        """An If-Modified-Since request for APKINDEX.tar.gz carrying the Last-Modified the
        proxy gave (what apk sends when refreshing) gets a 304 from the cache, even with the
        upstream gone; an older date gets the whole index."""
        first = self.fetch_index_and_wait_learned()
        last_modified = first.headers.get("last-modified")
        self.assertTrue(last_modified, f"no Last-Modified on the index\n{first.report()}")
        self.wait_until_hit(self.repo.index_path)
        self.upstream.stop()

        result = self.forward(self.repo.index_path, [f"If-Modified-Since: {last_modified}"])
        self.assertEqual(
            (result.returncode, result.status), (0, 304), f"{result.report()}\n{self._context()}"
        )
        self.assertEqual(result.body, b"")
        self.assertEqual(result.x_cache, "HIT", result.report())

        old = "Sat, 01 Jan 2000 00:00:00 GMT"
        result = self.forward(self.repo.index_path, [f"If-Modified-Since: {old}"])
        self.assert_body(result, self.repo.index, "APKINDEX.tar.gz with an old date")
        self.assertEqual(result.x_cache, "HIT", result.report())


class SizeMismatchTests(AlpineCase):
    """A package whose file size disagrees with the index's ``S:`` is refused.

    The index here is written the way abuild writes it: no end-of-archive blocks after the
    signature segment.
    """

    size_mismatch = ("pkgproxy-hello",)

    def test_size_mismatch_is_refused_and_not_stored(self) -> None:
        """After the index was fetched, a package whose size is not its ``S:`` is a 502 (or
        a broken transfer), is fetched upstream again next time, and never served from the
        cache; the packages that match their records are unaffected."""
        self.fetch_index_and_wait_learned()
        bad = self.repo.package("pkgproxy-hello")
        self.assertEqual(bad.lies, "size")
        self.assertNotEqual(len(bad.data), bad.size)
        self.assert_refused_and_not_stored(bad)
        for pkg in self.repo.packages:
            if pkg is not bad:
                self.assert_body(self.forward(pkg.path), pkg.data, pkg.basename)


class ChecksumMismatchTests(AlpineCase):
    """Packages of the right size whose control checksum disagrees with ``C:`` are refused.

    The index here has end-of-archive blocks after its signature segment too, so the
    checks also prove that pkgproxy reads such an index.
    """

    checksum_mismatch = ("pkgproxy-extra", "pkgproxy-blob")
    signature_end_marker = True

    def test_checksum_mismatch_is_refused_and_not_stored(self) -> None:
        """After the index was fetched, a package of exactly ``S:`` bytes whose control
        stream does not hash to ``C:`` never completes cleanly for the client (small and
        ~200 KiB ones alike), is not stored, and the next request goes upstream again."""
        self.fetch_index_and_wait_learned()
        for name in self.checksum_mismatch:
            bad = self.repo.package(name)
            self.assertEqual((bad.lies, len(bad.data)), ("checksum", bad.size))
            self.assert_refused_and_not_stored(bad)
        good = self.repo.package("pkgproxy-hello")
        self.assert_body(self.forward(good.path), good.data, good.basename)


class UnverifiedCopyTests(AlpineCase):
    """A package cached before the index was known must still obey the index later.

    PROTOCOLS.md 3.2: packages are immutable *after verification* against the current
    index; "if the index lists different S/C for that name, refetch". A client may ask
    for a package before pkgproxy has the index (a client with an index of its own, a
    restart before the cached indexes are read again, the race in :class:`IndexRaceTests`).
    """

    size_mismatch = ("pkgproxy-hello",)
    checksum_mismatch = ("pkgproxy-extra",)

    def test_copy_that_contradicts_a_later_index_is_not_served(self) -> None:
        """Packages fetched while no index was known are stored unchecked; once the index
        says they are wrong (size, or control checksum), pkgproxy must not keep serving
        them as HITs: it fetches again and then refuses them."""
        for name in ("pkgproxy-hello", "pkgproxy-extra"):
            pkg = self.repo.package(name)
            self.assert_body(self.forward(pkg.path), pkg.data, f"{name} before the index")
            self.wait_until_hit(pkg.path)
        self.fetch_index_and_wait_learned()
        problems = []
        for name in ("pkgproxy-hello", "pkgproxy-extra"):
            pkg = self.repo.package(name)
            result = self.forward(pkg.path)
            if result.clean_200 and result.body == pkg.data:
                problems.append(
                    f"{pkg.basename}: served as X-Cache {result.x_cache} although its "
                    f"{pkg.lies} disagrees with the index now cached"
                )
        if problems:
            self.fail("\n".join(problems) + f"\n{self._context()}")


#: Records in the large index of :class:`IndexRaceTests`: about Alpine's community repo.
RACE_FILLER = 20000


class IndexRaceTests(TestCase):
    """A package asked for right after the index arrived is checked against that index.

    apk fetches APKINDEX.tar.gz and, a few milliseconds later, the packages it lists. The
    proxy must not let the second request slip in before it has read the first.
    """

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.repo = alpinerepo.build_alpine_repo(base, size_mismatch=("pkgproxy-hello",))
        # Same packages, plus many filler records: an index the size of Alpine's
        # community repository, which takes pkgproxy a noticeable time to parse.
        filler = [alpinerepo.ApkSpec(f"filler-{i:05d}", "1.0-r0") for i in range(RACE_FILLER)]
        records = [
            alpinerepo.index_record(s, self.repo.arch, 1000, "Q1" + "A" * 27 + "=") for s in filler
        ]
        text = self.repo.apkindex_text + "\n".join(records) + "\n"
        with open(os.path.join(self.repo.root, self.repo.index_path), "wb") as f:
            f.write(alpinerepo.build_index(text))
        self.upstream = start_static_server(self, self.repo.serve_dir)
        self.proxy = start_pkgproxy(self, config(self.upstream, self.repo.mount))

    def _context(self) -> str:
        return f"{self.proxy.logs()}\n{self.upstream.logs()}"

    def _get(self, url: str) -> tuple[int, bytes, str]:
        """A forward-mode GET on a fresh connection to pkgproxy (no process start-up, so
        it follows the previous answer as closely as apk's next request would)."""
        conn = http.client.HTTPConnection(HOST, self.proxy.port, timeout=CURL_TIMEOUT)
        try:
            conn.request("GET", url, headers={"Host": "dl-cdn.alpinelinux.org"})
            resp = conn.getresponse()
            try:
                body = resp.read()
            except (http.client.IncompleteRead, OSError):
                body = b"<incomplete>"
            return resp.status, body, resp.getheader("x-cache") or ""
        except (OSError, http.client.HTTPException) as e:
            return 0, f"<{type(e).__name__}: {e}>".encode(), ""
        finally:
            conn.close()

    def test_package_right_after_index_is_checked(self) -> None:
        """The package requested immediately after the index's last byte is refused when
        its size disagrees with that index, and is not stored."""
        status, _, _ = self._get(FORWARD_BASE + self.repo.index_path)
        self.assertEqual(status, 200)
        bad = self.repo.package("pkgproxy-hello")
        status, body, x_cache = self._get(FORWARD_BASE + bad.path)
        later = [self._get(FORWARD_BASE + bad.path) for _ in range(2)]
        context = self._context()
        if status == 200 and body == bad.data:
            self.fail(
                f"{bad.basename} ({len(bad.data)} bytes, index S:{bad.size}) was served as a "
                f"clean 200 (X-Cache {x_cache}) right after the index\n{context}"
            )
        self.assertNotIn(
            "HIT", [x for _, _, x in later], f"the refused package was stored\n{context}"
        )

    def test_package_right_after_restart_is_checked(self) -> None:
        """After a restart on a cache that holds the index, the first package request the
        ready proxy answers is checked against that index (read again at start-up): a
        package whose size disagrees with it is refused and not stored."""
        index_url = FORWARD_BASE + self.repo.index_path
        self.assertEqual(self._get(index_url)[0], 200)
        deadline = time.monotonic() + WAIT_TIMEOUT
        while self._get(index_url)[2] != "HIT":  # committed to the cache
            if time.monotonic() > deadline:
                self.fail(f"the index was never committed\n{self._context()}")
            time.sleep(0.05)
        self.proxy.stop()
        self.proxy = start_pkgproxy(
            self, config(self.upstream, self.repo.mount), cache_dir=self.proxy.cache_dir
        )
        bad = self.repo.package("pkgproxy-hello")
        status, body, x_cache = self._get(FORWARD_BASE + bad.path)
        later = [self._get(FORWARD_BASE + bad.path) for _ in range(2)]
        if status == 200 and body == bad.data:
            self.fail(
                f"{bad.basename} ({len(bad.data)} bytes, index S:{bad.size}) was served as a "
                f"clean 200 (X-Cache {x_cache}) right after the restart\n{self._context()}"
            )
        self.assertNotIn(
            "HIT", [x for _, _, x in later], f"the refused package was stored\n{self._context()}"
        )
