"""A cluster: three pkgproxy nodes behind Debian's HAProxy, run from etc/haproxy/pkgproxy.cfg.

Why this test exists: pkgproxy's promise of one origin fetch per file holds for a whole
cluster only if HAProxy sends every request for a file to the same node, keeps doing so
while nodes come and go (consistent hashing: a lost node moves only its own share), and
retries a request a dying node never answered without ever passing off a cut transfer
as a whole file. That is configuration, not code, so the shipped configuration itself is
what runs here: the test only puts 127.0.0.1 ports in place of the example addresses and
has HAProxy connect from 127.0.0.2, so that a node can tell the balancer (a trusted
proxy) from the client it names in its PROXY protocol header (127.0.0.1).

The files live under the ``npm`` route's prefix, turned into a plain immutable file
route: the route whose prefix (``/npm/``) differs from its forward prefix's path
(``http://registry.npmjs.org/``), so a file asked both ways shows that the hashing key
is the same.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass

from twisted.trial.unittest import TestCase

from tests.support.haproxy import BALANCER_SOURCE, haproxy_config, node_names
from tests.support.procs import (
    HOST,
    PkgProxy,
    ServerProcess,
    _fail_start,
    clean_env,
    file_tree,
    free_port,
    start_pkgproxy,
)
from tests.support.slowserver import SlowServer, start_slow_server

NODES = tuple(node_names())
TIMEOUT = 30.0
WAIT = 15.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HAProxy(ServerProcess):
    """``haproxy -db -f CFG`` in the foreground."""


@dataclass
class Reply:
    status: int
    body: bytes
    cache: str
    node: str
    complete: bool
    error: str = ""


class Cluster:
    """An upstream, three nodes and HAProxy, all on loopback, all stopped by the test."""

    def __init__(
        self, test: TestCase, files: dict[str, bytes], rate: float, node_config: str = ""
    ) -> None:
        root = file_tree(test, {f"files/{n}": b for n, b in files.items()})
        self.upstream: SlowServer = start_slow_server(test, root, rate=rate)
        self.nodes: dict[str, PkgProxy] = {}
        for name in NODES:
            self.nodes[name] = start_pkgproxy(
                test,
                f'trusted_proxies = ["{BALANCER_SOURCE}"]\n'
                f'admin_networks = ["{HOST}/32"]\n'
                f'node_name = "{name}"\n'
                f"{node_config}"
                "[routes.npm]\n"
                'family = "generic"\nimmutable = true\n'
                f'upstream = "{self.upstream.url("/")}"\n',
            )
        self.port = free_port()
        work = os.path.abspath(test.mktemp())
        os.makedirs(work)
        cfg = os.path.join(work, "haproxy.cfg")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(haproxy_config(self.port, [n.port for n in self.nodes.values()]))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.haproxy = HAProxy(
            "haproxy",
            [haproxy, "-db", "-f", cfg],
            self.port,
            os.path.join(work, "haproxy.log"),
            clean_env(),
            cwd=work,
        )
        test.addCleanup(self.haproxy.stop)
        self._wait_all_up(test)

    def _wait_all_up(self, test: TestCase) -> None:
        """Until every node has answered through HAProxy (its checks are passing)."""
        deadline = time.monotonic() + WAIT
        seen: set[str] = set()
        i = 0
        while seen != set(NODES):
            if time.monotonic() > deadline or not self.haproxy.running:
                _fail_start(test, self.haproxy, f"nodes seen through HAProxy: {sorted(seen)}")
            try:
                seen.add(self.get(f"/npm/probe/warm{i}", method="HEAD").node)
            except (OSError, http.client.HTTPException):
                time.sleep(0.1)
            i += 1

    def get(
        self, path: str, *, method: str = "GET", host: str | None = None, port: int | None = None
    ) -> Reply:
        """One request through HAProxy (or to ``port``); a cut transfer is not complete."""
        conn = http.client.HTTPConnection(HOST, port or self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, headers={"Host": host} if host else {})
            resp = conn.getresponse()
            cache = resp.headers.get("X-Cache", "")
            node = resp.headers.get("X-Cache-Node", "")
            try:
                body = resp.read()
            except (OSError, http.client.HTTPException) as e:
                return Reply(resp.status, b"", cache, node, False, repr(e))
            return Reply(resp.status, body, cache, node, True)
        finally:
            conn.close()

    def node_of(self, keys: list[str]) -> dict[str, str]:
        """Which node each probe path is sent to now (HEAD: nothing is downloaded)."""
        return {k: self.get(k, method="HEAD").node for k in keys}

    def entries(self) -> dict[str, int]:
        """Cache entries per node (nodes still running)."""
        return {n: p.cache_entries() for n, p in self.nodes.items() if p.running}


def _parallel(n: int, work: object) -> list[object]:
    """Run ``work(i)`` for i in range(n) on n threads; every result or exception."""
    results: list[object] = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = work(i)  # type: ignore[operator]
        except Exception as e:  # noqa: BLE001 - the test inspects every outcome
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return results


class ClusterTests(TestCase):
    timeout = 90

    def test_stampede_one_origin_fetch(self) -> None:
        """20 clients at once on one uncached large file: one origin fetch, all streamed."""
        big = os.urandom(12 * 1024 * 1024)
        cluster = Cluster(self, {"big.bin": big}, rate=4_000_000)  # about 3 s to fetch
        replies = _parallel(20, lambda i: cluster.get("/npm/files/big.bin"))
        for r in replies:
            assert isinstance(r, Reply), r
            self.assertEqual((r.status, r.complete, _sha(r.body)), (200, True, _sha(big)))
        self.assertEqual(cluster.upstream.requests("/files/big.bin"), 1)
        caches = Counter(r.cache for r in replies if isinstance(r, Reply))
        self.assertEqual(caches, {"MISS": 1, "COALESCED": 19})
        self.assertEqual(len({r.node for r in replies if isinstance(r, Reply)}), 1)

    def test_spread_and_hits_and_real_client(self) -> None:
        """200 files twice: the second pass is all hits, each file on exactly one node."""
        files = {f"f{i:03d}.bin": os.urandom(2048 + i) for i in range(200)}
        cluster = Cluster(self, files, rate=100_000_000)
        names = sorted(files)

        def fetch_all() -> dict[str, Reply]:
            out: dict[str, Reply] = {}
            for chunk in range(0, len(names), 20):
                batch = names[chunk : chunk + 20]
                got = _parallel(len(batch), lambda i, b=batch: cluster.get(f"/npm/files/{b[i]}"))
                for name, r in zip(batch, got, strict=True):
                    assert isinstance(r, Reply), r
                    self.assertEqual((r.status, r.body), (200, files[name]), name)
                    out[name] = r
            return out

        first = fetch_all()
        self.assertEqual({r.cache for r in first.values()}, {"MISS"})
        owner = {n: r.node for n, r in first.items()}
        per_node = Counter(owner.values())
        self.assertEqual(set(per_node), set(NODES))
        self.assertTrue(all(c >= 30 for c in per_node.values()), per_node)
        for name, proc in cluster.nodes.items():
            proc.wait_for_entries(per_node[name], timeout=WAIT)
        second = fetch_all()
        self.assertEqual({r.cache for r in second.values()}, {"HIT"})
        self.assertEqual({n: r.node for n, r in second.items()}, owner)
        # Stored once: each node holds exactly the files hashed to it, and each file was
        # fetched from the origin once.
        self.assertEqual(cluster.entries(), dict(per_node))
        self.assertEqual(sum(cluster.upstream.requests(f"/files/{n}") for n in names), 200)

        # The same file asked as an absolute URI (pkgproxy as the client's HTTP proxy)
        # has the same key: the same node answers it from its cache.
        for name in names[:10]:
            r = cluster.get(f"http://registry.npmjs.org/files/{name}", host="registry.npmjs.org")
            self.assertEqual(
                (r.status, r.cache, r.node, r.body), (200, "HIT", owner[name], files[name])
            )

        # The nodes see the real client, not the balancer: the status page (open to
        # 127.0.0.1 only) answers through HAProxy, names its node, and so do the metrics.
        page = cluster.get("/_pkgproxy/")
        self.assertEqual(page.status, 200, page.body[:300])
        self.assertIn(
            f'<span class="node" title="node_name">{page.node}</span>'.encode(), page.body
        )
        metrics = cluster.get("/_pkgproxy/metrics")
        self.assertIn(f'node="{metrics.node}"'.encode(), metrics.body)
        with open(cluster.nodes[owner[names[0]]].log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertRegex(log, rf'\] {re.escape(HOST)} "GET /npm/files/{names[0]}"')
        self.assertNotIn(f'{BALANCER_SOURCE} "GET /npm/files/', log)

    def test_one_key_by_path_and_by_uri(self) -> None:
        """A file asked by path and by absolute URI reaches the same node, on every
        built-in route that can be asked both ways (docs/cluster.md's table)."""
        # Offline nodes: they answer every request at once (503), and never reach out.
        cluster = Cluster(self, {}, rate=100_000_000, node_config="offline = true\n")
        spellings = [
            ("/debian/pool/main/h/h{i}.deb", "http://deb.debian.org/debian/pool/main/h/h{i}.deb"),
            (
                "/debian-security/dists/d{i}",
                "http://security.debian.org/debian-security/dists/d{i}",
            ),
            ("/ubuntu/pool/main/u{i}.deb", "http://archive.ubuntu.com/ubuntu/pool/main/u{i}.deb"),
            ("/ubuntu-security/pool/s{i}.deb", "http://security.ubuntu.com/ubuntu/pool/s{i}.deb"),
            ("/ubuntu-ports/pool/p{i}.deb", "http://ports.ubuntu.com/ubuntu-ports/pool/p{i}.deb"),
            (
                "/alpine/v3.20/main/a{i}.apk",
                "http://dl-cdn.alpinelinux.org/alpine/v3.20/main/a{i}.apk",
            ),
            (
                "/npm/pkg{i}/-/pkg{i}-1.0.0.tgz",
                "http://registry.npmjs.org/pkg{i}/-/pkg{i}-1.0.0.tgz",
            ),
            ("/npm/@s/n{i}", "http://registry.npmjs.org/@s/n{i}"),
            ("/pypi/simple/p{i}/", "http://pypi.org/simple/p{i}/"),
            ("/pypi/files/packages/f{i}.whl", "http://files.pythonhosted.org/packages/f{i}.whl"),
        ]
        for by_path, by_uri in spellings:
            nodes = set()
            for i in range(12):  # by chance alike 12 times in a row: 1 in 3**12
                path, uri = by_path.format(i=i), by_uri.format(i=i)
                host = uri.split("/")[2]
                a = cluster.get(path, method="HEAD")
                b = cluster.get(uri, method="HEAD", host=host)
                self.assertEqual(a.node, b.node, (path, uri))
                nodes.add(a.node)
            self.assertGreater(len(nodes), 1, by_path)  # and they do spread

    def test_node_killed_mid_batch(self) -> None:
        """kill -9 one node during 30 downloads: whole files or failed transfers, never
        short ones; requests it never answered are retried on the next node; afterwards
        only the dead node's keys (about a third) move."""
        files = {f"k{i:02d}.bin": os.urandom(1024 * 1024 + i) for i in range(30)}
        cluster = Cluster(self, files, rate=1_500_000)  # about 0.7 s per file
        names = sorted(files)
        owner = {
            p.rsplit("/", 1)[1]: n
            for p, n in cluster.node_of([f"/npm/files/{n}" for n in names]).items()
        }
        victim = Counter(owner.values()).most_common(1)[0][0]
        probes = [f"/npm/probe/p{i:03d}" for i in range(200)]
        before = cluster.node_of(probes)

        replies: list[object] = []
        batch = threading.Thread(
            target=lambda: replies.extend(
                _parallel(len(names), lambda i: cluster.get(f"/npm/files/{names[i]}"))
            ),
            daemon=True,
        )
        batch.start()
        time.sleep(0.3)
        cluster.nodes[victim].kill9()
        # At once, before any health check can notice: HAProxy still sends these to the
        # dead node, is refused, and retries them on the next node of the ring.
        theirs = [f"/npm/files/{n}" for n in names if owner[n] == victim][:4]
        retried = _parallel(len(theirs), lambda i: cluster.get(theirs[i]))
        batch.join(TIMEOUT * 2)
        self.assertFalse(batch.is_alive(), "the batch of downloads hung")
        for path, r in zip(theirs, retried, strict=True):
            assert isinstance(r, Reply), r
            self.assertEqual((r.status, r.complete), (200, True), (path, r))
            self.assertEqual(r.body, files[path.rsplit("/", 1)[1]])
            self.assertNotEqual(r.node, victim)
        with open(cluster.haproxy.output_path, encoding="utf-8") as f:
            log = f.read()
        retries = re.compile(r" [0-9]+/[0-9]+/[0-9]+/[0-9]+/\+[1-9] ")
        self.assertTrue(
            any(retries.search(line) for line in log.splitlines() if f"GET {theirs[0]} " in line),
            f"HAProxy logged no retry of {theirs[0]}\n{log[-3000:]}",
        )

        whole = failed = 0
        for name, r in zip(names, replies, strict=True):
            if isinstance(r, Reply) and r.status == 200 and r.complete:
                self.assertEqual(_sha(r.body), _sha(files[name]), f"{name}: wrong body")
                whole += 1
            else:  # a refused or cut transfer, or an error status: the client knows
                failed += 1
        self.assertEqual(whole + failed, len(names))
        self.assertGreater(whole, 0)

        # Once HAProxy has marked the node down, only its keys have moved.
        deadline = time.monotonic() + WAIT
        mine = [k for k, n in before.items() if n == victim]
        while cluster.get(mine[0], method="HEAD").node == victim:
            self.assertLess(time.monotonic(), deadline, "HAProxy never took the node out")
            time.sleep(0.2)
        after = cluster.node_of(probes)
        moved = {k for k in probes if after[k] != before[k]}
        self.assertEqual(moved, set(mine))
        self.assertTrue(len(probes) * 0.2 <= len(moved) <= len(probes) * 0.5, len(moved))
        self.assertNotIn(victim, set(after.values()))

    def test_branch_with_the_cluster_as_parent(self) -> None:
        """A branch node whose parent is the cluster (HAProxy's address): a file is
        fetched from the origin once for branch and cluster together, and lands on the
        node its by-path clients reach; with HAProxy stopped, the branch goes direct."""
        files = {f"p{i}.bin": os.urandom(4096 + i) for i in range(3)}
        cluster = Cluster(self, files, rate=100_000_000)

        def branch(name: str) -> PkgProxy:
            return start_pkgproxy(
                self,
                f'node_name = "{name}"\n'
                "[upstream]\n"
                f'parent = "http://{HOST}:{cluster.port}"\n'
                "[routes.npm]\n"
                'family = "generic"\nimmutable = true\n'
                f'upstream = "{cluster.upstream.url("/")}"\n',
            )

        first = branch("branch-a")
        r = cluster.get("/npm/files/p0.bin", port=first.port)
        self.assertEqual((r.status, r.body, r.cache), (200, files["p0.bin"], "MISS"))
        self.assertEqual(cluster.upstream.requests("/files/p0.bin"), 1)
        deadline = time.monotonic() + WAIT
        while (by_path := cluster.get("/npm/files/p0.bin")).cache != "HIT":
            self.assertLess(time.monotonic(), deadline, by_path)
            time.sleep(0.05)
        self.assertEqual(by_path.body, files["p0.bin"])
        r = cluster.get("/npm/files/p0.bin", port=branch("branch-b").port)
        self.assertEqual((r.status, r.body, r.cache), (200, files["p0.bin"], "MISS"))
        self.assertEqual(cluster.upstream.requests("/files/p0.bin"), 1)

        cluster.haproxy.stop()
        r = cluster.get("/npm/files/p1.bin", port=first.port)
        self.assertEqual((r.status, r.body), (200, files["p1.bin"]))
        self.assertEqual(cluster.upstream.requests("/files/p1.bin"), 1)
