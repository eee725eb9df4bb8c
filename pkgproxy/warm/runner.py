"""The network side of pkgproxy-warm: tasks run by a bounded pool of worker threads.

A task reads one page (a PyPI project page, an npm packument, an OCI manifest, apt's
indexes) and returns the downloads it names, or is one download. A download first asks
the server with ``HEAD`` whether the file is cached (``X-Cache: HIT``: skipped), then reads
it with ``GET``, hashing it as it streams past and throwing the bytes away. Every request
carries ``User-Agent: pkgproxy-warm/<version> (<tag>)``, by which the server's status page
shows the warm-up.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from pkgproxy.config.model import Route
from pkgproxy.warm import aptroot
from pkgproxy.warm.sources import Want, integrity_digests

#: Bytes read from a body at a time.
CHUNK = 256 * 1024

PYPI_JSON = "application/vnd.pypi.simple.v1+json"
NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
OCI_INDEXES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
OCI_MANIFESTS = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
#: pkgproxy keeps a tag per ``Accept`` variant (a client that cannot read an index is never
#: served one), so a tag is read as each kind of client asks for it: containerd (Docker,
#: Kubernetes nodes), then containers/image (podman, buildah, skopeo).
OCI_CLIENT_ACCEPTS = (
    ", ".join((*OCI_MANIFESTS[::-1], *OCI_INDEXES[::-1], "*/*")),
    ", ".join(
        (
            *OCI_MANIFESTS,
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "application/vnd.docker.distribution.manifest.v1+json",
            *OCI_INDEXES[::-1],
        )
    ),
)
OCI_ACCEPT = ", ".join((*OCI_INDEXES, *OCI_MANIFESTS))


class WarmError(Exception):
    """One task failed; the message says why in one line."""


@dataclass
class Outcome:
    """What became of one file (or page)."""

    label: str
    path: str
    state: str  # "fetched", "cached", "planned", "failed", "page"
    size: int = 0
    cache: str = ""
    reason: str = ""


@dataclass
class Report:
    """Every outcome, in the order they came."""

    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(1 for o in self.outcomes if o.state == state)

    def bytes(self, state: str) -> int:
        return sum(o.size for o in self.outcomes if o.state == state)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]


class Server:
    """The pkgproxy server: one kept-alive HTTP connection per worker thread."""

    def __init__(
        self,
        base: str,
        routes: Sequence[Route],
        *,
        user_agent: str,
        timeout: float = 300.0,
    ) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WarmError(f"server URL {base!r} must be http://HOST[:PORT] or https://...")
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.routes = [r for r in routes if r.enabled]
        self.user_agent = user_agent
        self.timeout = timeout
        self._local = threading.local()

    def route(self, family: str, preferred: str | None = None) -> Route:
        """The route that serves ``family``: the one named ``preferred``, or else the one
        named like the family, or else the first of that family."""
        of_family = [r for r in self.routes if r.family == family]
        for name in (preferred, family):
            for r in of_family:
                if r.name == name:
                    return r
        if preferred is not None or not of_family:
            raise WarmError(
                f"the server has no enabled {family} route named {preferred or family!r}"
            )
        return of_family[0]

    def path_of(self, url: str) -> str:
        """The path on the server of ``url``: a link the server wrote (pointing at itself),
        or an upstream URL one of its routes serves."""
        if url.startswith("/"):
            return url
        if url.startswith(self.base + "/"):
            return url[len(self.base) :]
        for r in self.routes:
            for prefix in (r.upstream, *r.forward):
                if url.startswith(prefix):
                    return r.prefix + url[len(prefix) :]
        raise WarmError(f"{url} is on no route of the server")

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        """Send one request; a kept connection that the server closed is replaced once."""
        all_headers = {"User-Agent": self.user_agent, **(headers or {})}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, headers=all_headers)
                return conn.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                if attempt == 2 or not isinstance(
                    e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
                ):
                    raise WarmError(f"{method} {path}: {e or type(e).__name__}") from None
        raise AssertionError("unreachable")

    def get_json(self, path: str, accept: str) -> tuple[object, http.client.HTTPResponse]:
        """GET a document and parse it as JSON."""
        resp = self.request("GET", path, {"Accept": accept})
        body = resp.read()
        if resp.status != 200:
            raise WarmError(f"GET {path}: {_status_line(resp, body)}")
        try:
            return json.loads(body), resp
        except ValueError:
            raise WarmError(f"GET {path}: the answer is not JSON") from None


def _status_line(resp: http.client.HTTPResponse, body: bytes) -> str:
    first = body.decode("utf-8", "replace").strip().splitlines()[:1]
    return f"{resp.status} {resp.reason}" + (f": {first[0][:200]}" if first else "")


@dataclass
class Context:
    """What every task shares: the server, the options and the report."""

    server: Server
    dry_run: bool = False
    platform: str = "linux/amd64"
    keyring: str | None = None
    components: tuple[str, ...] = ("main",)
    routes: dict[str, str] = field(default_factory=dict)
    report: Report = field(default_factory=Report)
    on_outcome: Callable[[Outcome], None] = lambda o: None
    on_planned: Callable[[int], None] = lambda n: None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self.report.outcomes.append(outcome)
            self.on_outcome(outcome)


class Task:
    """One unit of work; :meth:`run` returns the tasks it leads to."""

    label: str

    def run(self, ctx: Context) -> list[Task]:
        raise NotImplementedError


@dataclass
class Download(Task):
    """One file: skipped if cached, else read through the server and checked."""

    label: str
    path: str
    digests: tuple[tuple[str, str], ...] = ()
    accept: str | None = None

    def run(self, ctx: Context) -> list[Task]:
        headers = {"Accept": self.accept} if self.accept else {}
        head = ctx.server.request("HEAD", self.path, headers)
        head.read()
        if head.status == 200 and head.getheader("X-Cache", "") == "HIT":
            size = int(head.getheader("Content-Length", "0") or 0)
            ctx.record(Outcome(self.label, self.path, "cached", size, "HIT"))
            return []
        if ctx.dry_run:
            size = int(head.getheader("Content-Length", "0") or 0) if head.status == 200 else 0
            ctx.record(Outcome(self.label, self.path, "planned", size))
            return []
        resp = ctx.server.request("GET", self.path, headers)
        if resp.status != 200:
            body = resp.read(4096)
            resp.read()
            raise WarmError(f"{self.label}: {_status_line(resp, body)}")
        hashers = {alg: hashlib.new(alg) for alg, _ in self.digests}
        size = 0
        while chunk := resp.read(CHUNK):
            size += len(chunk)
            for h in hashers.values():
                h.update(chunk)
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != size:
            raise WarmError(f"{self.label}: transfer cut off at {size} of {length} bytes")
        for alg, expected in self.digests:
            got = hashers[alg].hexdigest()
            if got != expected:
                raise WarmError(
                    f"{self.label}: {alg} mismatch: expected {expected}, the server sent {got}"
                )
        ctx.record(Outcome(self.label, self.path, "fetched", size, resp.getheader("X-Cache", "")))
        return []


class PageTask(Task):
    """Reads one page of a route (a project page, a packument) and follows it."""

    family = ""
    accept = ""
    name: str
    wants: list[Want]

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"{self.family} {self.name}"

    def page_path(self, route: Route) -> str:
        raise NotImplementedError

    def follow(self, ctx: Context, doc: dict[str, Any], page: str) -> list[Task]:
        raise NotImplementedError

    def run(self, ctx: Context) -> list[Task]:
        page = self.page_path(ctx.server.route(self.family, ctx.routes.get(self.family)))
        doc, _ = ctx.server.get_json(page, self.accept)
        ctx.record(Outcome(self.label, page, "page"))
        return self.follow(ctx, doc if isinstance(doc, dict) else {}, page)


@dataclass
class PypiProject(PageTask):
    """A project page, then the files whose SHA-256 the lock file pins."""

    family = "pypi"
    accept = PYPI_JSON
    name: str
    wants: list[Want]

    def page_path(self, route: Route) -> str:
        return f"{route.prefix}simple/{self.name}/"

    def follow(self, ctx: Context, doc: dict[str, Any], page: str) -> list[Task]:
        files = doc.get("files")
        by_sha = {
            str(f["hashes"].get("sha256", "")).lower(): f
            for f in (files if isinstance(files, list) else ())
            if isinstance(f, dict) and isinstance(f.get("hashes"), dict)
        }
        tasks: list[Task] = []
        for want in self.wants:
            found = 0
            for alg, hexa in want.digests:
                f = by_sha.get(hexa) if alg == "sha256" else None
                if f is None:
                    continue
                found += 1
                path = ctx.server.path_of(str(f["url"]).split("#", 1)[0])
                label = f"{want.name}=={want.version} {f.get('filename', '')}"
                tasks.append(Download(label, path, (("sha256", hexa),)))
                meta = f.get("core-metadata", f.get("dist-info-metadata"))
                if meta:
                    meta_digests = tuple(
                        (a, str(h).lower())
                        for a, h in (meta.items() if isinstance(meta, dict) else ())
                        if a in hashlib.algorithms_guaranteed
                    )
                    tasks.append(Download(label + ".metadata", path + ".metadata", meta_digests))
            if not found:
                ctx.record(
                    Outcome(
                        f"{want.name}=={want.version}",
                        page,
                        "failed",
                        reason="no file on the index page has a hash the lock file gives "
                        "(the lock file and the index disagree); nothing fetched",
                    )
                )
        return tasks


@dataclass
class NpmPackage(PageTask):
    """A packument, then the tarballs of the locked versions whose integrity it confirms."""

    family = "npm"
    accept = NPM_ACCEPT
    name: str
    wants: list[Want]

    def page_path(self, route: Route) -> str:
        return route.prefix + quote(self.name, safe="@").replace("/", "%2f")

    def follow(self, ctx: Context, doc: dict[str, Any], page: str) -> list[Task]:
        versions = doc.get("versions", {})
        tasks: list[Task] = []
        for want in self.wants:
            label = f"{want.name}@{want.version}"
            meta = versions.get(want.version) if isinstance(versions, dict) else None
            dist = meta.get("dist") if isinstance(meta, dict) else None
            if not isinstance(dist, dict) or not isinstance(dist.get("tarball"), str):
                ctx.record(
                    Outcome(label, page, "failed", reason="version not in the registry's packument")
                )
                continue
            known = dict(integrity_digests(str(dist.get("integrity", ""))))
            if not known and isinstance(dist.get("shasum"), str):
                known = {"sha1": dist["shasum"].lower()}
            clash = [alg for alg, hexa in want.digests if alg in known and known[alg] != hexa]
            if clash:
                ctx.record(
                    Outcome(
                        label,
                        page,
                        "failed",
                        reason=f"the lock file's {clash[0]} integrity differs from the registry's; "
                        "nothing fetched",
                    )
                )
                continue
            digests = want.digests or tuple(known.items())
            tasks.append(Download(label, ctx.server.path_of(dist["tarball"]), digests))
        return tasks


@dataclass
class DebianSet(Task):
    """apt's indexes through the server, then every ``.deb`` apt would fetch."""

    suite: str
    architecture: str
    names: list[str]

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"debian {self.suite}/{self.architecture}"

    def run(self, ctx: Context) -> list[Task]:
        route = ctx.server.route("debian", ctx.routes.get("debian"))
        try:
            files = aptroot.resolve(
                ctx.server.base + route.prefix,
                self.suite,
                self.architecture,
                self.names,
                components=ctx.components,
                keyring=ctx.keyring,
                user_agent=ctx.server.user_agent,
            )
        except aptroot.AptError as e:
            raise WarmError(f"{self.label}: {e}") from None
        ctx.record(Outcome(self.label, route.prefix, "page"))
        return [
            Download(
                f.url.rsplit("/", 1)[-1], ctx.server.path_of(f.url), ((f.algorithm, f.digest),)
            )
            for f in files
        ]


@dataclass
class OciManifest(Task):
    """A manifest (by tag or digest): an index leads to the platform's manifest, a
    manifest to its config and layers."""

    registry: str
    repository: str
    reference: str

    @property
    def label(self) -> str:  # type: ignore[override]
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"

    def _path(self, kind: str, ref: str) -> str:
        return f"/v2/{self.repository}/{kind}/{ref}?ns={self.registry}"

    def run(self, ctx: Context) -> list[Task]:
        path = self._path("manifests", self.reference)
        by_tag = not self.reference.startswith("sha256:")
        doc, resp = ctx.server.get_json(path, OCI_CLIENT_ACCEPTS[0] if by_tag else OCI_ACCEPT)
        if not isinstance(doc, dict):
            raise WarmError(f"{self.label}: the manifest is not a JSON object")
        ctx.record(Outcome(self.label, path, "page", cache=resp.getheader("X-Cache", "")))
        for accept in OCI_CLIENT_ACCEPTS[1:] if by_tag else ():
            ctx.server.get_json(path, accept)
        media = doc.get("mediaType") or resp.getheader("Content-Type", "")
        if media in OCI_INDEXES or "manifests" in doc:
            chosen = _platform(doc.get("manifests", []), ctx.platform)
            if chosen is None:
                raise WarmError(f"{self.label}: no manifest for platform {ctx.platform}")
            return [OciManifest(self.registry, self.repository, chosen)]
        blobs = [doc.get("config")] + list(doc.get("layers") or [])
        tasks: list[Task] = []
        for blob in blobs:
            digest = blob.get("digest") if isinstance(blob, dict) else None
            if not isinstance(digest, str) or not digest.startswith("sha256:"):
                continue
            tasks.append(
                Download(
                    f"{self.registry}/{self.repository}@{digest[:19]}",
                    self._path("blobs", digest),
                    (("sha256", digest[7:]),),
                )
            )
        return tasks


def _platform(manifests: object, platform: str) -> str | None:
    os_, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    for m in manifests if isinstance(manifests, list) else ():
        p = m.get("platform") if isinstance(m, dict) else None
        if not isinstance(p, dict):
            continue
        if p.get("os") == os_ and p.get("architecture") == arch:
            if not variant or p.get("variant") == variant:
                digest = m.get("digest")
                return digest if isinstance(digest, str) else None
    return None


def plan(
    wants: Iterable[Want], *, suite: str | None = None, architecture: str | None = None
) -> list[Task]:
    """The first tasks for everything the files pin (pages first; files follow from them)."""
    pypi: dict[str, list[Want]] = {}
    npm: dict[str, list[Want]] = {}
    debian: dict[tuple[str, str], list[str]] = {}
    tasks: list[Task] = []
    seen_images: set[tuple[str, str]] = set()
    for w in wants:
        if w.family == "pypi":
            pypi.setdefault(w.name, []).append(w)
        elif w.family == "npm":
            npm.setdefault(w.name, []).append(w)
        elif w.family == "debian":
            s, a = w.extra if w.extra else (suite, architecture)
            if not s or not a:
                raise WarmError(
                    f"package {w.name}: a package list without a suite and architecture "
                    "needs --suite and --arch"
                )
            debian.setdefault((s, a), []).append(w.name)
        elif w.family == "oci":
            registry, _, repository = w.name.partition("/")
            if (w.name, w.version) not in seen_images:
                seen_images.add((w.name, w.version))
                tasks.append(OciManifest(registry, repository, w.version))
    tasks += [PypiProject(n, ws) for n, ws in pypi.items()]
    tasks += [NpmPackage(n, ws) for n, ws in npm.items()]
    tasks += [DebianSet(s, a, sorted(set(ns))) for (s, a), ns in debian.items()]
    return tasks


def run_tasks(tasks: list[Task], ctx: Context, jobs: int) -> Report:
    """Run ``tasks`` and all they lead to, at most ``jobs`` at a time."""
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="warm") as pool:
        pending: dict[Future[list[Task]], Task] = {}

        def submit(batch: list[Task]) -> None:
            ctx.on_planned(sum(1 for t in batch if isinstance(t, Download)))
            for t in batch:
                pending[pool.submit(t.run, ctx)] = t

        submit(tasks)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                try:
                    children = fut.result()
                except WarmError as e:
                    path = getattr(task, "path", "")
                    ctx.record(Outcome(task.label, path, "failed", reason=str(e)))
                    children = []
                except Exception as e:  # noqa: BLE001 - one broken task must not stop the rest
                    ctx.record(Outcome(task.label, "", "failed", reason=f"{type(e).__name__}: {e}"))
                    children = []
                submit(children)
    return ctx.report


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
