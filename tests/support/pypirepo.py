"""A tiny PyPI built by the tests: wheels, their simple pages, and an index server.

Why not pypiserver: it links files relatively on its own host, so the rewriting that
matters for pypi.org (absolute links to a second host) would go untested. This imitates
pypi.org instead: one origin serves the index (PEP 503 HTML or PEP 691 JSON by
``Accept``, the JSON API, 301 for a name without its slash) and links every file
absolutely on a second origin laid out like files.pythonhosted.org
(``packages/<2>/<2>/<60>/<name>``, the path being the file's BLAKE2b-256), where each
wheel's PEP 658 ``.metadata`` lies beside it.

Wheels are written by hand (``METADATA``, ``WHEEL``, ``RECORD``), byte for byte the same on
every run, so their hashes are stable. The names start with ``pkgproxy-demo``: should a
client ever reach the public index by mistake, the install fails instead of taking
someone else's package.

Run as ``python -m tests.support.pypirepo --root DIR --port N [--html-only]`` to serve an
index directory this module wrote; ``--html-only`` ignores ``Accept`` like a static
directory of HTML files.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from twisted.trial.unittest import SynchronousTestCase

from tests.support import procs

HTML = "text/html"
V1_JSON = "application/vnd.pypi.simple.v1+json"
_DATE = (2026, 11, 27, 0, 0, 0)


def normalize(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Release:
    """One wheel to build: project, version and what its metadata says."""

    project: str
    version: str
    requires: tuple[str, ...] = ()
    requires_python: str | None = None
    yanked: str | None = None  # the reason; "" yanks without one
    #: Bytes served by the files host instead of the wheel the index describes.
    tampered: bool = False


@dataclass(frozen=True)
class Dist:
    """A built wheel as the index lists it."""

    release: Release
    filename: str
    path: str  # below the files host: packages/aa/bb/<60>/<filename>
    sha256: str
    size: int
    metadata_sha256: str


@dataclass
class PypiRepo:
    """A written repository: serve :attr:`index_dir` and :attr:`files_dir`."""

    index_dir: str
    files_dir: str
    files_url: str
    dists: list[Dist] = field(default_factory=list)

    def dist(self, project: str, version: str) -> Dist:
        """The wheel of ``project`` ``version``."""
        for d in self.dists:
            if normalize(d.release.project) == normalize(project) and d.release.version == version:
                return d
        raise KeyError((project, version))


#: The projects every end-to-end test installs from: the app needs the lib (spelled
#: unnormalised on purpose); of the lib's versions only 1.0 is installable (1.1 is
#: yanked, 2.0 needs Python 4), so pip choosing 1.0 proves those attributes survived.
DEFAULT_RELEASES = (
    Release("pkgproxy-demo-lib", "1.0"),
    Release("pkgproxy-demo-lib", "1.1", yanked="broken build"),
    Release("pkgproxy-demo-lib", "2.0", requires_python=">=4"),
    Release("pkgproxy-demo-app", "1.0", requires=("PkgProxy_Demo.Lib>=1.0",)),
    Release("pkgproxy-demo-tampered", "1.0", tampered=True),
)


def pathological_pages(size: int) -> list[bytes]:
    """Simple pages of about ``size`` bytes built to make a scanner backtrack or re-read:
    an unterminated quote after many tags, endless ``<``, an attribute name of the whole
    size, an unterminated quote of quotes, an unclosed comment or script, attributes with
    no end. None of their links leads anywhere a proxy serves."""
    return [
        b'<a href="//elsewhere.test/x">' * (size // 30) + b'<a href="' + b"y" * size,
        b"<" * size,
        b"<a " + b"n" * size,
        b"<a href=" + b"'" * size,
        b"<!--" + b"<a href=x>" * (size // 10),
        b"<script>" + b"<a href=x>" * (size // 10),
        b"<a x=1 " * (size // 7),
    ]


def _module(project: str) -> str:
    return normalize(project).replace("-", "_")


def metadata(release: Release) -> bytes:
    """The wheel's ``METADATA``, also served as its PEP 658 ``.metadata`` file."""
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {release.project}",
        f"Version: {release.version}",
        "Summary: A fixture of pkgproxy's tests",
    ]
    if release.requires_python:
        lines.append(f"Requires-Python: {release.requires_python}")
    lines += [f"Requires-Dist: {r}" for r in release.requires]
    return ("\n".join(lines) + "\n\n").encode()


def build_wheel(release: Release) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a deterministic pure-Python wheel."""
    module = _module(release.project)
    dist_info = f"{module}-{release.version}.dist-info"
    code = f"VERSION = {release.version!r}\n"
    for req in release.requires:
        dep = _module(re.split(r"[<>=!~ ;]", req, maxsplit=1)[0])
        code += f"from {dep} import VERSION as {dep.upper()}_VERSION  # noqa: F401\n"
    files = {
        f"{module}/__init__.py": code.encode(),
        f"{dist_info}/METADATA": metadata(release),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: pkgproxy-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n\n"
        ),
    }
    record = io.StringIO()
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.write(f"{name},sha256={digest.decode()},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, _DATE)
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return f"{module}-{release.version}-py3-none-any.whl", out.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _project_html(name: str, dists: Sequence[Dist], files_url: str) -> bytes:
    """A project page as Warehouse renders it (PROTOCOLS.md 4.4)."""
    out = [
        "<!DOCTYPE html>\n<html>\n  <head>\n",
        '    <meta name="pypi:repository-version" content="1.1">\n',
        f"    <title>Links for {name}</title>\n  </head>\n  <body>\n",
        f"    <h1>Links for {name}</h1>\n",
    ]
    for d in dists:
        attrs = [f'href="{files_url}{d.path}#sha256={d.sha256}"']
        if d.release.requires_python:
            attrs.append(f'data-requires-python="{html.escape(d.release.requires_python)}"')
        if d.release.yanked is not None:
            attrs.append(f'data-yanked="{html.escape(d.release.yanked)}"')
        attrs.append(f'data-dist-info-metadata="sha256={d.metadata_sha256}"')
        attrs.append(f'data-core-metadata="sha256={d.metadata_sha256}"')
        out.append(f"    <a {' '.join(attrs)}>{d.filename}</a><br />\n")
    out.append("  </body>\n</html>\n<!--SERIAL 1-->")
    return "".join(out).encode()


def _file_json(d: Dist, files_url: str) -> dict[str, object]:
    entry: dict[str, object] = {
        "filename": d.filename,
        "url": files_url + d.path,
        "hashes": {"sha256": d.sha256},
        "requires-python": d.release.requires_python,
        "yanked": d.release.yanked or (d.release.yanked is not None),
        "size": d.size,
        "upload-time": "2026-11-27T00:00:00.000000Z",
        "core-metadata": {"sha256": d.metadata_sha256},
        "dist-info-metadata": {"sha256": d.metadata_sha256},
    }
    return entry


def build_pypi_repo(
    workdir: str, files_url: str, releases: Sequence[Release] = DEFAULT_RELEASES
) -> PypiRepo:
    """Write wheels under ``workdir/files`` and the index under ``workdir/index``.

    ``files_url`` is where the files directory will be served (ending in ``/``): the
    index links every file absolutely there, as pypi.org does.
    """
    repo = PypiRepo(os.path.join(workdir, "index"), os.path.join(workdir, "files"), files_url)
    for release in releases:
        filename, wheel = build_wheel(release)
        meta = metadata(release)
        blake = hashlib.blake2b(wheel, digest_size=32).hexdigest()
        path = f"packages/{blake[:2]}/{blake[2:4]}/{blake[4:]}/{filename}"
        served = wheel[:-30] + bytes(30) if release.tampered else wheel
        _write(os.path.join(repo.files_dir, path), served)
        _write(os.path.join(repo.files_dir, path + ".metadata"), meta)
        repo.dists.append(
            Dist(
                release,
                filename,
                path,
                hashlib.sha256(wheel).hexdigest(),
                len(wheel),
                hashlib.sha256(meta).hexdigest(),
            )
        )
    projects = sorted({normalize(d.release.project) for d in repo.dists})
    root_html = "".join(f'    <a href="/simple/{p}/">{p}</a>\n' for p in projects)
    _write(
        os.path.join(repo.index_dir, "simple", "index.html"),
        f"<!DOCTYPE html>\n<html>\n  <body>\n{root_html}  </body>\n</html>\n".encode(),
    )
    _write(
        os.path.join(repo.index_dir, "simple", "index.json"),
        json.dumps(
            {"meta": {"api-version": "1.1"}, "projects": [{"name": p} for p in projects]}
        ).encode(),
    )
    for project in projects:
        dists = [d for d in repo.dists if normalize(d.release.project) == project]
        page_dir = os.path.join(repo.index_dir, "simple", project)
        _write(os.path.join(page_dir, "index.html"), _project_html(project, dists, files_url))
        doc = {
            "meta": {"api-version": "1.1", "_last-serial": 1},
            "name": project,
            "versions": sorted({d.release.version for d in dists}),
            "files": [_file_json(d, files_url) for d in dists],
        }
        _write(os.path.join(page_dir, "index.json"), json.dumps(doc, indent=1).encode())
        api = {
            "info": {"name": project, "version": dists[-1].release.version},
            "releases": {
                d.release.version: [
                    {
                        "filename": d.filename,
                        "url": files_url + d.path,
                        "digests": {"sha256": d.sha256},
                        "size": d.size,
                        "packagetype": "bdist_wheel",
                    }
                ]
                for d in dists
            },
            "urls": [],
        }
        _write(os.path.join(repo.index_dir, "pypi", project, "json"), json.dumps(api).encode())
    return repo


# -- the index server -----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Serves an index directory written by :func:`build_pypi_repo`, like pypi.org."""

    protocol_version = "HTTP/1.1"
    root = ""
    html_only = False

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(
            f"{self.command} {self.path} accept={self.headers.get('Accept', '')!r} "
            f"{format % args}\n"
        )
        sys.stdout.flush()

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        m = re.fullmatch(r"/simple/(?:([^/]+)/)?", path)
        if re.fullmatch(r"/simple/[^/]+", path):
            self._send(301, b"", {"Location": path + "/"})
            return
        if m is not None:
            wants_json = not self.html_only and V1_JSON in self.headers.get("Accept", "")
            ctype = V1_JSON if wants_json else HTML
            name = "index.json" if wants_json else "index.html"
            file = os.path.join(self.root, "simple", *([m[1]] if m[1] else []), name)
            extra = {"Vary": "Accept", "Cache-Control": "max-age=600, public"}
        elif re.fullmatch(r"/pypi/[^/]+/json", path):
            file, ctype, extra = os.path.join(self.root, path.strip("/")), "application/json", {}
        else:
            self._send(404, b"", {})
            return
        try:
            with open(file, "rb") as f:
                body = f.read()
        except OSError:
            self._send(404, b"", {})
            return
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if self.headers.get("If-None-Match") == etag:
            self._send(304, b"", {"ETag": etag})
            return
        self._send(200, body, {"Content-Type": ctype, "ETag": etag, **extra})


def main(argv: Sequence[str] | None = None) -> None:
    """Serve an index directory on 127.0.0.1 until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--html-only", action="store_true")
    args = parser.parse_args(argv)
    _Handler.root = args.root
    _Handler.html_only = args.html_only
    ThreadingHTTPServer(("127.0.0.1", args.port), _Handler).serve_forever()


def start_index_server(
    testcase: SynchronousTestCase, index_dir: str, *, html_only: bool = False
) -> procs.ServerProcess:
    """Serve ``index_dir`` with :func:`main` in a child process until the test ends.

    The server's log (one line per request, with its ``Accept``) is ``.log_path``.
    """
    log_dir = os.path.abspath(testcase.mktemp())
    os.makedirs(log_dir)
    argv = [sys.executable, "-u", "-m", "tests.support.pypirepo", "--root", index_dir]
    port = procs.free_port()
    argv += ["--port", str(port)] + (["--html-only"] if html_only else [])
    server = procs.ServerProcess(
        "pypi-index",
        argv,
        port,
        os.path.join(log_dir, "pypi-index.log"),
        procs.clean_env({"PYTHONPATH": procs.REPO_ROOT}),
        cwd=procs.REPO_ROOT,
    )
    testcase.addCleanup(server.stop)
    error = procs._wait_tcp(server, 10.0)
    if error:
        procs._fail_start(testcase, server, error)
    return server


if __name__ == "__main__":
    main()
