"""Real OCI registries for the end-to-end tests: CNCF distribution, skopeo and a token service.

* :func:`write_layout` writes an OCI image layout by hand (``oci-layout``, ``index.json``,
  ``blobs/sha256/``): deterministic gzip tar layers, a config, a manifest, and for a
  multi-arch image an index over two platform manifests. Every digest is known in advance,
  so a test can check what a client received against what was pushed.
* :func:`start_registry` runs Debian's ``docker-registry`` (CNCF distribution 2.8) on
  127.0.0.1 from a config of its own, with filesystem storage in a temp dir and, given a
  :class:`TokenAuth`, Docker Hub's token authentication.
* :func:`start_token_server` runs this module as a small token service: it signs RS256 JWTs
  with an ``x5c`` header (a self-signed certificate the registry trusts as its
  ``rootcertbundle``) and grants every scope asked for, anonymously, as Docker Hub does for
  public images. It logs each request, so a test can see which scopes were asked for.
* :class:`Skopeo` runs skopeo isolated from the machine: a policy file that accepts
  anything, an empty ``registries.conf``, an empty ``registries.d``, no credentials, a
  private ``--tmpdir``. As root, skopeo 1.9 writes its blob-info cache to
  ``/var/lib/containers/cache`` and no option moves it, so a root test runs skopeo as
  ``nobody`` (``setpriv``) with ``XDG_DATA_HOME`` in a temp dir; a non-root test only
  needs ``XDG_DATA_HOME``.

Every server is a :class:`~tests.support.procs.ServerProcess`: own process group, stopped by
a cleanup registered before its readiness wait, every wait bounded.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import HOST, REPO_ROOT, ServerProcess, clean_env, free_port

OCI_LAYOUT = "application/vnd.oci.image.layout.v1"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: The ``Accept`` header containerd's resolver sends (remotes/docker/resolver.go).
CONTAINERD_ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"))
REF_NAME = "org.opencontainers.image.ref.name"
#: Fixed timestamps keep every blob, and so every digest, the same on every run.
EPOCH = 1700000000
CREATED = "2023-11-14T22:13:20Z"
SKOPEO_TIMEOUT = 60.0
#: uid and gid of ``nobody``/``nogroup`` on Debian.
NOBODY = 65534


# --- image layouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Bytes as a registry stores them, with the media type their descriptor names."""

    media_type: str
    data: bytes

    @property
    def hex(self) -> str:
        """The sha256 of :attr:`data`, 64 hex digits."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def digest(self) -> str:
        """``sha256:<hex>``."""
        return "sha256:" + self.hex

    @property
    def size(self) -> int:
        """Length of :attr:`data` in bytes."""
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """An OCI descriptor pointing at this blob, plus ``extra`` fields."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def _json(doc: Mapping[str, Any]) -> bytes:
    """Canonical-enough JSON: sorted keys, no spaces (the bytes are what the digest names)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def layer_blob(files: Mapping[str, bytes]) -> tuple[Blob, str]:
    """A gzip tar layer of ``files`` (path -> content): ``(blob, diff_id)``.

    Deterministic: fixed mtime, owner root, mode 0644, sorted names, and a gzip header
    without file name or time, so the same files always give the same digest.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = EPOCH
            info.mode = 0o644
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(files[name]))
    tar_bytes = raw.getvalue()
    packed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as gz:
        gz.write(tar_bytes)
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return Blob(OCI_LAYER_GZIP, packed.getvalue()), diff_id


@dataclass(frozen=True)
class Image:
    """One platform's image: its manifest, config and layers."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    architecture: str

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """The config and the layers: what ``/blobs/`` serves for this image."""
        return (self.config, *self.layers)


def build_image(label: str, architecture: str = "amd64", layers: int = 2) -> Image:
    """A small image whose every byte depends on ``label`` and ``architecture`` only.

    Different labels give different digests, so two registries holding images of the
    same name can be told apart by what a client receives.
    """
    layer_blobs, diff_ids = [], []
    for i in range(layers):
        files = {
            f"etc/pkgproxy-test/{label}-{i}.txt": f"{label} {architecture} layer {i}\n".encode(),
            f"usr/share/pkgproxy-test/{i}/data.bin": hashlib.sha256(
                f"{label}/{architecture}/{i}".encode()
            ).digest()
            * 64,
        }
        blob, diff_id = layer_blob(files)
        layer_blobs.append(blob)
        diff_ids.append(diff_id)
    config = Blob(
        OCI_CONFIG,
        _json(
            {
                "architecture": architecture,
                "os": "linux",
                "created": CREATED,
                "config": {"Cmd": ["/bin/true"], "Labels": {"pkgproxy.test": label}},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created": CREATED, "created_by": f"pkgproxy test {label}"}],
            }
        ),
    )
    manifest = Blob(
        OCI_MANIFEST,
        _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [b.descriptor() for b in layer_blobs],
            }
        ),
    )
    return Image(manifest, config, tuple(layer_blobs), architecture)


@dataclass(frozen=True)
class Layout:
    """An OCI image layout on disk, holding one tag.

    :ivar top: what the tag names: the image's manifest, or for a multi-arch image the
        index over :attr:`images`.
    """

    path: str
    tag: str
    top: Blob
    images: tuple[Image, ...]

    @property
    def multi_arch(self) -> bool:
        """True if the tag names an index."""
        return self.top.media_type == OCI_INDEX

    def image(self, architecture: str) -> Image:
        """The image of one architecture."""
        return next(i for i in self.images if i.architecture == architecture)


def write_layout(path: str, tag: str, images: Sequence[Image]) -> Layout:
    """Write an OCI image layout at ``path`` whose ``tag`` names ``images``.

    One image: the tag names its manifest. Several: the tag names an OCI index listing
    each manifest with its ``linux/<architecture>`` platform.
    """
    if len(images) == 1:
        top = images[0].manifest
    else:
        top = Blob(
            OCI_INDEX,
            _json(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": [
                        i.manifest.descriptor(
                            platform={"architecture": i.architecture, "os": "linux"}
                        )
                        for i in images
                    ],
                }
            ),
        )
    blob_dir = os.path.join(path, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    blobs = [top] + [b for i in images for b in (i.manifest, *i.blobs)]
    for blob in blobs:
        with open(os.path.join(blob_dir, blob.hex), "wb") as f:
            f.write(blob.data)
    with open(os.path.join(path, "oci-layout"), "wb") as f:
        f.write(_json({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [top.descriptor(annotations={REF_NAME: tag})],
    }
    with open(os.path.join(path, "index.json"), "wb") as f:
        f.write(_json(index))
    return Layout(path, tag, top, tuple(images))


# --- skopeo ------------------------------------------------------------------------------


@dataclass
class SkopeoResult:
    """One finished (or timed out) skopeo run."""

    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exited 0 in time."""
        return not self.timed_out and self.returncode == 0

    def report(self) -> str:
        """Command line, status and output, for failure messages."""
        status = "timed out" if self.timed_out else f"exit status {self.returncode}"
        return (
            f"$ {' '.join(self.argv)}\n({status})\n--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-4000:]}"
        )


class Skopeo:
    """skopeo, isolated from the machine's containers configuration and credentials.

    :attr:`root` is a private directory (removed at cleanup) for everything skopeo reads
    and writes: image layouts, ``dir:`` copies, its configuration, temp files and
    blob-info cache. Use :meth:`path` for locations in it.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self._testcase = testcase
        self.root = tempfile.mkdtemp(prefix="pkgproxy-skopeo-")
        testcase.addCleanup(shutil.rmtree, self.root, True)
        for d in ("home", "data", "run", "tmp", "registries.d"):
            os.makedirs(self.path(d))
        with open(self.path("policy.json"), "w", encoding="utf-8") as f:
            json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
        with open(self.path("registries.conf"), "w", encoding="utf-8"):
            pass
        os.chmod(self.path("run"), 0o700)
        self._prefix = self._drop_privileges()
        self.env = clean_env(
            {
                "HOME": self.path("home"),
                "XDG_DATA_HOME": self.path("data"),
                "XDG_CONFIG_HOME": self.path("home"),
                "XDG_RUNTIME_DIR": self.path("run"),
                "TMPDIR": self.path("tmp"),
                "REGISTRY_AUTH_FILE": self.path("home", "auth.json"),
                "CONTAINERS_REGISTRIES_CONF": self.path("registries.conf"),
            }
        )

    def path(self, *parts: str) -> str:
        """A path below :attr:`root`."""
        return os.path.join(self.root, *parts)

    def _chown(self) -> None:
        """Give :attr:`root` to ``nobody`` (before each run, when skopeo runs as nobody)."""
        for top, dirs, files in os.walk(self.root):
            for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
                os.lchown(name, NOBODY, NOBODY)

    def _drop_privileges(self) -> list[str]:
        """The command prefix that runs skopeo as ``nobody`` if we are root, else ``[]``.

        Falls back to running as root (its blob-info cache then lands in
        ``/var/lib/containers/cache``) if ``setpriv`` is missing or ``nobody`` cannot
        write to :attr:`root` (a parent directory closed to others).
        """
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            return []
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
        self._chown()
        probe = subprocess.run(
            [*prefix, "sh", "-c", f'touch "{self.root}/probe" && rm "{self.root}/probe"'],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
        return prefix if probe.returncode == 0 else []

    def run(self, args: Sequence[str], timeout: float = SKOPEO_TIMEOUT) -> SkopeoResult:
        """Run ``skopeo <global options> <args>``; never raises on failure."""
        argv = [
            *self._prefix,
            "skopeo",
            "--policy",
            self.path("policy.json"),
            "--registries-conf",
            self.path("registries.conf"),
            "--registries.d",
            self.path("registries.d"),
            "--tmpdir",
            self.path("tmp"),
            *args,
        ]
        if self._prefix:
            self._chown()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self.env,
                cwd=self.root,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
            return SkopeoResult(argv, None, out, err, timed_out=True)
        return SkopeoResult(argv, proc.returncode, proc.stdout, proc.stderr)

    def check(self, args: Sequence[str], context: str = "") -> SkopeoResult:
        """:meth:`run`, failing the test (with ``context``, e.g. server logs) unless it exits 0."""
        result = self.run(args)
        if not result.ok:
            self._testcase.fail(f"skopeo failed:\n{result.report()}\n{context}")
        return result

    def push(self, layout: Layout, hostport: str, repository: str, context: str = "") -> None:
        """Push ``layout``'s tag to ``docker://hostport/repository:tag`` byte for byte.

        ``--preserve-digests`` makes skopeo fail rather than rewrite a manifest, so the
        registry then holds exactly the digests the layout names.
        """
        args = ["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        args += ["--dest-no-creds", "--all"] if layout.multi_arch else ["--dest-no-creds"]
        self.check(
            [
                *args,
                f"oci:{layout.path}:{layout.tag}",
                f"docker://{hostport}/{repository}:{layout.tag}",
            ],
            context,
        )

    def pull(self, reference: str, dest: str, *extra: str, context: str = "") -> SkopeoResult:
        """``skopeo copy docker://<reference> dir:<dest>`` over plain HTTP, anonymously."""
        return self.check(
            [
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--src-no-creds",
                *extra,
                f"docker://{reference}",
                f"dir:{dest}",
            ],
            context,
        )

    def inspect(self, reference: str, *extra: str, context: str = "") -> Any:
        """``skopeo inspect docker://<reference>``, parsed from JSON."""
        result = self.check(
            ["inspect", "--tls-verify=false", "--no-creds", *extra, f"docker://{reference}"],
            context,
        )
        return json.loads(result.stdout)


def dir_copy_problems(dest: str, top: Blob, images: Sequence[Image]) -> list[str]:
    """What is wrong with skopeo's ``dir:`` copy at ``dest`` (``[]``: nothing).

    ``manifest.json`` must be ``top`` (the manifest or index pulled) byte for byte; every
    blob file (named by its sha256) and every ``<sha256>.manifest.json`` must hash to its
    name; and the blobs must be exactly the configs and layers of ``images``.
    """
    problems = []
    with open(os.path.join(dest, "manifest.json"), "rb") as f:
        data = f.read()
    if data != top.data:
        got = hashlib.sha256(data).hexdigest()
        problems.append(f"manifest.json is sha256:{got}, not the pushed {top.digest}")
    blobs = set()
    for name in sorted(os.listdir(dest)):
        hex_name = name.removesuffix(".manifest.json")
        if len(hex_name) != 64:
            continue
        with open(os.path.join(dest, name), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        if got != hex_name:
            problems.append(f"{name}: sha256 is {got}")
        if hex_name == name:
            blobs.add(name)
    want = {b.hex for i in images for b in i.blobs}
    if blobs != want:
        problems.append(f"blobs {sorted(blobs)} are not the pushed {sorted(want)}")
    return problems


# --- the registry and its token service --------------------------------------------------


@dataclass(frozen=True)
class TokenAuth:
    """What a token-authenticated registry and its token service share.

    :ivar cert_path: PEM certificate: the registry's ``rootcertbundle``, and the ``x5c``
        chain of every token.
    :ivar key_path: PEM private key the token service signs with.
    """

    service: str
    issuer: str
    cert_path: str
    key_path: str
    port: int = field(default_factory=free_port)

    @property
    def realm(self) -> str:
        """The token endpoint the registry names in its challenges."""
        return f"http://{HOST}:{self.port}/token"


def make_token_auth(directory: str, service: str = "pkgproxy-test-registry") -> TokenAuth:
    """A fresh RSA key and a self-signed certificate for it in ``directory``.

    Made with ``cryptography`` (a dependency of pyOpenSSL), so no ``openssl`` binary is
    needed. Valid from an hour ago for a day: clock skew cannot break it.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    from pkgproxy.tlsca import write_pem

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pkgproxy test token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "token-key.pem")
    cert_path = os.path.join(directory, "token-cert.pem")
    write_pem(key, cert, key_path, cert_path)
    return TokenAuth(service, "pkgproxy-test-issuer", cert_path, key_path)


class Registry(ServerProcess):
    """A running ``docker-registry``; :attr:`hostport` is how skopeo names it."""

    def __init__(self, argv: Sequence[str], port: int, log_path: str, storage: str) -> None:
        self.storage = storage
        env = {k: v for k, v in clean_env().items() if not k.startswith("REGISTRY_")}
        super().__init__("docker-registry", argv, port, log_path, env)

    @property
    def hostport(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"


class TokenServer(ServerProcess):
    """This module's token service; :meth:`requests` lists what it was asked for."""

    def requests(self) -> list[dict[str, Any]]:
        """One dict per token request: ``service``, ``scope`` (a list), ``authorization``."""
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        prefix = "TOKEN "
        records = [json.loads(line[len(prefix) :]) for line in lines if line.startswith(prefix)]
        return [r for r in records if r["path"] == "/token"]


def _wait_http(testcase: SynchronousTestCase, server: ServerProcess, timeout: float) -> None:
    """Wait until ``GET /v2/`` gets any HTTP answer; fail the test with the log otherwise."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.running:
            last = f"exited with status {server.process.returncode}"
            break
        conn = http.client.HTTPConnection(HOST, server.port, timeout=2.0)
        try:
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            return
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        time.sleep(0.05)
    server.kill9()
    testcase.fail(
        f"{server.name} did not answer GET /v2/ within {timeout} s ({last})\n"
        f"command: {' '.join(server.argv)}\n{server.logs()}"
    )


def start_registry(
    testcase: SynchronousTestCase,
    *,
    auth: TokenAuth | None = None,
    port: int | None = None,
    timeout: float = 15.0,
) -> Registry:
    """Run ``docker-registry serve`` on 127.0.0.1 until the test ends.

    Storage is a fresh temp dir; with ``auth`` every request needs a Bearer token from
    ``auth.realm``. The config is JSON, which YAML reads as well, so paths need no
    quoting rules. Waits until ``/v2/`` answers (200, or 401 with ``auth``).
    """
    work = os.path.abspath(testcase.mktemp())
    storage = os.path.join(work, "storage")
    os.makedirs(storage)
    port = port or free_port()
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": storage},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{HOST}:{port}", "secret": "pkgproxy-test-secret"},
        "health": {"storagedriver": {"enabled": False}},
    }
    if auth is not None:
        config["auth"] = {
            "token": {
                "realm": auth.realm,
                "service": auth.service,
                "issuer": auth.issuer,
                "rootcertbundle": auth.cert_path,
            }
        }
    config_path = os.path.join(work, "config.yml")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    registry = Registry(
        [binary, "serve", config_path], port, os.path.join(work, "registry.log"), storage
    )
    testcase.addCleanup(registry.stop)
    _wait_http(testcase, registry, timeout)
    return registry


def start_token_server(
    testcase: SynchronousTestCase, auth: TokenAuth, timeout: float = 15.0
) -> TokenServer:
    """Run the token service for ``auth`` on ``auth.port`` until the test ends."""
    work = os.path.abspath(testcase.mktemp())
    os.makedirs(work)
    argv = [
        sys.executable,
        "-u",
        "-m",
        "tests.support.ociregistry",
        "--port",
        str(auth.port),
        "--key",
        auth.key_path,
        "--cert",
        auth.cert_path,
        "--issuer",
        auth.issuer,
        "--service",
        auth.service,
    ]
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    server = TokenServer(
        "token-server",
        argv,
        auth.port,
        os.path.join(work, "token-server.log"),
        clean_env({"PYTHONPATH": pythonpath}),
        cwd=REPO_ROOT,
    )
    testcase.addCleanup(server.stop)
    _wait_http(testcase, server, timeout)
    return server


# --- the token service itself (runs as ``python -m tests.support.ociregistry``) ----------


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _access(scopes: Sequence[str]) -> list[dict[str, Any]]:
    """``repository:library/x:pull,push`` -> distribution's ``access`` claim entries."""
    access = []
    for scope in scopes:
        head, _, actions = scope.rpartition(":")
        kind, _, name = head.partition(":")
        if kind and name:
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
    return access


def _serve_tokens(argv: Sequence[str] | None = None) -> None:
    """Serve ``GET /token?service=&scope=``: an RS256 JWT for every scope asked for."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    parser = argparse.ArgumentParser(description=__doc__)
    for option in ("--port", "--key", "--cert", "--issuer", "--service"):
        parser.add_argument(option, required=True)
    args = parser.parse_args(argv)
    with open(args.key, "rb") as f:
        loaded = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise SystemExit(f"{args.key}: not an RSA key (RS256 needs one)")
    key: rsa.RSAPrivateKey = loaded  # declared: the narrowing reaches the handler below
    with open(args.cert, "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
    header = _b64url(_json({"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            service = query.get("service", [""])[0]
            record = {
                "path": url.path,
                "service": service,
                "scope": scopes,
                "authorization": self.headers.get("Authorization") is not None,
            }
            print("TOKEN " + json.dumps(record), flush=True)
            if url.path != "/token" or service != args.service:
                self.send_error(400 if url.path == "/token" else 404)
                return
            now = int(time.time())
            claims = {
                "iss": args.issuer,
                "sub": "",
                "aud": args.service,
                "exp": now + 300,
                "nbf": now - 30,
                "iat": now,
                "jti": base64.b16encode(os.urandom(8)).decode(),
                "access": _access(scopes),
            }
            signing_input = header + b"." + _b64url(_json(claims))
            signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
            token = (signing_input + b"." + _b64url(signature)).decode()
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *fmt_args: Any) -> None:  # noqa: A002
            print(format % fmt_args, flush=True)

    ThreadingHTTPServer((HOST, int(args.port)), Handler).serve_forever()


if __name__ == "__main__":
    _serve_tokens()
