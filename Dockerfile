# pkgproxy in a container: twistd in the foreground, cache on a volume, non-root.
FROM python:3.12-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir . \
    # twistd caches plugin discovery; a non-root runtime could not rewrite it.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && mkdir -p /etc/pkgproxy /var/cache/pkgproxy \
    && cp etc/pkgproxy.toml /etc/pkgproxy/pkgproxy.toml \
    && useradd --system --home-dir /var/cache/pkgproxy pkgproxy \
    && chown pkgproxy:pkgproxy /var/cache/pkgproxy

USER pkgproxy
VOLUME /var/cache/pkgproxy
EXPOSE 3142
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3142/_pkgproxy/health', timeout=4)"
CMD ["twistd", "-n", "--pidfile=", "pkgproxy", "--config", "/etc/pkgproxy/pkgproxy.toml"]
