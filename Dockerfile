# pkgproxy in a container: twistd in the foreground, the cache on a volume, not root.
#
#   docker build -t pkgproxy .
#   docker run -d --name pkgproxy -p 3142:3142 -v pkgproxy-cache:/var/cache/pkgproxy pkgproxy
#
# Configuration: /etc/pkgproxy/pkgproxy.toml (etc/pkgproxy.toml of this repository); mount
# your own over it. The admin pages answer admin_networks only (loopback by default): add
# the network your browser or Prometheus comes from, as the container sees it.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ca-certificates: https upstreams are verified against the system's trust store.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN pip install /src \
    # twistd caches plugin discovery in dropin.cache; the non-root user below could not
    # rewrite it, so it is written now, as root.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && mkdir -p /etc/pkgproxy /var/cache/pkgproxy \
    && cp /src/etc/pkgproxy.toml /etc/pkgproxy/pkgproxy.toml \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/cache/pkgproxy --shell /usr/sbin/nologin pkgproxy \
    && chown pkgproxy:pkgproxy /var/cache/pkgproxy

USER pkgproxy
WORKDIR /var/cache/pkgproxy
VOLUME /var/cache/pkgproxy
EXPOSE 3142
# Liveness only: /_pkgproxy/ready would mark a container that is still reading a large
# cache index as unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:3142/_pkgproxy/health', timeout=4)"]
# --pidfile= : no pid file, so a stale one from a previous run can never stop a restart.
CMD ["twistd", "-n", "--pidfile=", "pkgproxy", "--config", "/etc/pkgproxy/pkgproxy.toml"]
