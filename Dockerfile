# pkgproxy in a container: twistd in the foreground, the cache on a volume, not root.
#
#   docker build -t pkgproxy .
#   docker run -d --name pkgproxy -p 3142:3142 -v pkgproxy-cache:/var/cache/pkgproxy pkgproxy
#
# Any Debian-like base with Python 3.11 or newer works, e.g. a local one made with
# debootstrap (see README.md, "Docker"): --build-arg BASE=localhost/debian:bookworm.
# pkgproxy goes into a virtual environment, /opt/pkgproxy, so Debian's own python3 (which
# refuses system-wide pip installs, PEP 668) serves as well as python:3.12-slim's.
#
# Configuration: /etc/pkgproxy/pkgproxy.toml (etc/pkgproxy.toml of this repository); mount
# your own over it. The admin pages answer admin_networks only (loopback by default): add
# the network your browser or Prometheus comes from, as the container sees it.
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/pkgproxy/bin:$PATH \
    # What the HEALTHCHECK asks: change it with the port your configuration listens on.
    PKGPROXY_HEALTH_URL=http://127.0.0.1:3142/_pkgproxy/health

# python3 with venv, and ca-certificates (https upstreams are verified against the system's
# trust store). python:3.12-slim has them all; a bare Debian base gets Debian's, and a base
# that already has them is not touched (no apt-get, no network).
RUN set -eu; \
    missing=""; \
    [ -s /etc/ssl/certs/ca-certificates.crt ] || missing="ca-certificates"; \
    python3 -c "import ensurepip, venv" 2>/dev/null || missing="$missing python3 python3-venv"; \
    if [ -n "$missing" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $missing \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The dependencies first, in a layer of their own, from the lists in setup.cfg and
# pyproject.toml: a rebuild after a change to the code only reinstalls pkgproxy itself,
# where the builder keeps layers.
# A build that reaches PyPI through a TLS-inspecting proxy, or a private index, gets what
# pip needs as build secrets, mounted for this step only and never stored in the image:
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt   (PIP_CERT)
#   --secret id=pip.conf,src=build-pip.conf     (PIP_CONFIG_FILE: index-url, trusted-host, proxy)
COPY setup.cfg pyproject.toml /src/
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca-bundle \
    set -eu; \
    if [ -s /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    python3 -m venv /opt/pkgproxy; \
    /opt/pkgproxy/bin/python -c 'import configparser, tomllib; \
c = configparser.ConfigParser(); c.read("/src/setup.cfg"); \
print(c["options"]["install_requires"]); \
print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["build-system"]["requires"]))' \
        > /tmp/requirements.txt; \
    /opt/pkgproxy/bin/pip install -r /tmp/requirements.txt; \
    rm -rf /tmp/requirements.txt /src

# pkgproxy itself: no index is asked (its dependencies and build tools are all there).
COPY . /src
RUN set -eu; \
    /opt/pkgproxy/bin/pip install --no-deps --no-build-isolation --no-index /src; \
    /opt/pkgproxy/bin/pip check; \
    # twistd caches plugin discovery in dropin.cache; the non-root user below could not
    # rewrite it, so it is written now, as root.
    /opt/pkgproxy/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"; \
    mkdir -p /etc/pkgproxy /var/cache/pkgproxy; \
    cp /src/etc/pkgproxy.toml /etc/pkgproxy/pkgproxy.toml; \
    rm -rf /src; \
    # Fixed ids, so a host directory for the volume can be prepared: chown 10001:10001 DIR.
    groupadd --system --gid 10001 pkgproxy; \
    useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/cache/pkgproxy \
        --shell /usr/sbin/nologin pkgproxy; \
    chown pkgproxy:pkgproxy /var/cache/pkgproxy

USER pkgproxy
WORKDIR /var/cache/pkgproxy
VOLUME /var/cache/pkgproxy
EXPOSE 3142
# Liveness only: /_pkgproxy/ready would mark a container that is still reading a large
# cache index as unhealthy. No proxy: a container's http_proxy must not answer for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/pkgproxy/bin/python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['PKGPROXY_HEALTH_URL'], timeout=4)"]
# --pidfile= : no pid file, so a stale one from a previous run can never stop a restart
# (and the non-root user needs no writable place for one).
CMD ["/opt/pkgproxy/bin/twistd", "-n", "--pidfile=", "pkgproxy", "--config", "/etc/pkgproxy/pkgproxy.toml"]
