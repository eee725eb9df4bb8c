"""OCI registries (Docker Hub and any distribution-spec registry), pulled through.

Blobs and manifests named by digest never change: they are kept forever and their
sha256 must equal the digest before they are stored. A manifest named by a tag is an
index of sorts: kept per ``Accept`` variant, revalidated after the route's TTL with a
HEAD (which Docker Hub does not count as a pull) comparing ``Docker-Content-Digest``,
and its body must match the digest the registry names. Writes are refused. The
client-facing ``/v2/`` answers without ever challenging the client, so no Docker daemon
is asked to send its user's registry password to the cache. PROTOCOLS.md section 6.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

from pkgproxy import httputil
from pkgproxy.config.model import Route
from pkgproxy.families import (
    CacheClass,
    Decision,
    Facts,
    Family,
    LocalAnswer,
    Refused,
    Request,
)

_NAME = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
_DIGEST = r"sha256:[a-f0-9]{64}"
_MANIFEST_BY_DIGEST = re.compile(rf"^(?P<name>{_NAME})/manifests/(?P<digest>{_DIGEST})$")
_MANIFEST_BY_TAG = re.compile(
    rf"^(?P<name>{_NAME})/manifests/(?P<tag>[a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}})$"
)
_BLOB = re.compile(rf"^(?P<name>{_NAME})/blobs/(?P<digest>{_DIGEST})$")
_TAGS = re.compile(rf"^(?P<name>{_NAME})/tags/list$")
_REFERRERS = re.compile(rf"^(?P<name>{_NAME})/referrers/(?P<digest>{_DIGEST})$")

#: What a manifest request asks for when the client names nothing: every current type.
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
#: Docker Hub's registry names; their one-component repositories live under library/.
DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


#: Other names containerd and the daemon use for Docker Hub.
_REGISTRY_ALIASES = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}
#: What follows a repository name in a distribution-spec path.
_AFTER_NAME = ("/manifests/", "/blobs/", "/tags/", "/referrers/")


def route_request(path: str, query: str, routes: Mapping[str, Route]) -> tuple[Route, str] | None:
    """containerd names the registry in ``?ns=`` (a host mirror for every registry at
    ``/v2/``): that names the route, and the parameter is not forwarded."""
    if not path.startswith("/v2/") or "ns=" not in query:
        return None
    params = parse_qsl(query, keep_blank_values=True)
    ns = [v for k, v in params if k == "ns"]
    rest_query = urlencode([(k, v) for k, v in params if k != "ns"])
    name = ns[0].lower()
    route = routes.get(_REGISTRY_ALIASES.get(name, name))
    if route is None:
        raise Refused(f"registry {ns[0]!r} is not configured on this mirror")
    rest = path[len("/v2/") :]
    return route, f"{rest}?{rest_query}" if rest_query else rest


def auth_scope(path: str) -> str:
    """A registry's token covers one repository: ``<name>`` of ``<name>/blobs/...``."""
    for marker in _AFTER_NAME:
        if marker in path:
            return path.split(marker, 1)[0]
    return path.rsplit("/", 1)[0]


def error_body(status: int, message: str) -> tuple[str, bytes]:
    """The OCI error document for an error the proxy answers itself."""
    code = {
        401: "UNAUTHORIZED",
        403: "DENIED",
        404: "NAME_UNKNOWN",
        405: "UNSUPPORTED",
        429: "TOOMANYREQUESTS",
    }.get(status, "UNSUPPORTED" if status < 500 else "UNAVAILABLE")
    doc = {"errors": [{"code": code, "message": message, "detail": None}]}
    return "application/json", json.dumps(doc).encode()


def _accept_variant(accept: str) -> tuple[str, str]:
    """``(cache variant, Accept to send upstream)`` for a manifest-by-tag request.

    The variant is the set of media types the client accepts, so a client that cannot
    read an index is never served one that another client fetched.
    """
    types = sorted({media for media, q in httputil.parse_accept(accept) if q > 0})
    if not types or types == ["*/*"]:
        return "all", ", ".join(MANIFEST_TYPES)
    return "+".join(types), ", ".join(types)


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (below the registry's ``/v2/``) of an OCI route."""
    if path == "":
        return Decision(
            CacheClass.PASS,
            local=LocalAnswer(200, "{}", None, "application/json", API_VERSION),
        )
    if path == "_catalog":
        return Decision(CacheClass.PASS, local=LocalAnswer(404, "no catalog on a mirror"))
    repo = path
    match = (
        _MANIFEST_BY_DIGEST.match(path)
        or _BLOB.match(path)
        or _MANIFEST_BY_TAG.match(path)
        or _TAGS.match(path)
        or _REFERRERS.match(path)
    )
    if match is None:
        return Decision(CacheClass.PASS, local=LocalAnswer(404, f"not a registry path: /v2/{path}"))
    name = match.group("name")
    upstream_url = None
    if route.name in DOCKER_HUB and "/" not in name:
        # The daemon sends library/alpine; other clients may send alpine.
        repo = "library/" + path
        upstream_url = route.upstream + repo
    headers = dict(API_VERSION)
    digest = match.groupdict().get("digest")
    if match.re in (_MANIFEST_BY_DIGEST, _BLOB):
        assert digest is not None
        headers["Docker-Content-Digest"] = digest
        return Decision(
            CacheClass.IMMUTABLE,
            digests={"sha256": digest.split(":", 1)[1]},
            # A registry answers a manifest only in a type the request accepts; the
            # bytes are fixed by the digest, so every type is accepted.
            upstream_headers=(
                {"Accept": ", ".join(MANIFEST_TYPES)} if match.re is _MANIFEST_BY_DIGEST else {}
            ),
            response_headers=headers,
            upstream_url=upstream_url,
        )
    if match.re is _MANIFEST_BY_TAG:
        variant, accept = _accept_variant(request.accept if request is not None else "")
        return Decision(
            CacheClass.MUTABLE,
            ttl=route.index_ttl,
            variant=variant,
            upstream_headers={"Accept": accept},
            response_headers={**headers, "Vary": "Accept"},
            upstream_url=upstream_url,
            digest_header="Docker-Content-Digest",
            head_revalidate=True,
            head_fetches=True,
        )
    if match.re is _TAGS:
        return Decision(
            CacheClass.MUTABLE,
            ttl=min(route.index_ttl, 60.0),
            response_headers=headers,
            upstream_url=upstream_url,
        )
    return Decision(CacheClass.PASS, response_headers=headers, upstream_url=upstream_url)


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    # OCI registries live under /v2/ (a Docker mirror must be a host root): Docker Hub
    # at /v2/ itself, others at /v2/<registry>/ or by containerd's ?ns=<registry>. The
    # route name is the registry's name. index_ttl is how long a tag is trusted.
    Route(
        name="docker.io",
        family="oci",
        prefix="/v2/",
        upstream="https://registry-1.docker.io/v2/",
        index_ttl=300.0,
        # Blobs are 307-redirected to Docker's CDNs (docs.docker.com, allow-list).
        redirect_hosts=(
            "production.cloudflare.docker.com",
            "production.cloudfront.docker.com",
            "docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com",
            "docker-images-prod.r2.cloudflarestorage.com",
        ),
    ),
    Route(
        name="ghcr.io",
        family="oci",
        prefix="/v2/ghcr.io/",
        upstream="https://ghcr.io/v2/",
        index_ttl=300.0,
        redirect_hosts=(
            "pkg-containers.githubusercontent.com",
            "github-production-container-registry.s3.amazonaws.com",
        ),
    ),
    Route(
        name="quay.io",
        family="oci",
        prefix="/v2/quay.io/",
        upstream="https://quay.io/v2/",
        index_ttl=300.0,
        redirect_hosts=("cdn.quay.io", "*.quay.io"),  # cdn01..cdn03.quay.io
    ),
)

FAMILY = Family(
    classify,
    error_body=error_body,
    routes=ROUTES,
    prefix_root="/v2/",
    route_request=route_request,
    auth_scope=auth_scope,
    prefix_root_error="/v2/ is where OCI registries live: an oci route's prefix starts with "
    "/v2/ (e.g. /v2/ghcr.io/), and no other route's does",
)
