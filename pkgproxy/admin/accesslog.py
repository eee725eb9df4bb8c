"""The access log: one line per finished request, through ``twisted.logger``.

It replaces Twisted's own ``Site`` log line (see :mod:`pkgproxy.web.site`), because that
one cannot say what matters here: whether the cache answered, and how long the upstream
took. Lines go to the ``pkgproxy.access`` namespace of the normal twistd log, so they reach
journald or ``docker logs`` with everything else and carry their fields as structured
event keys for any JSON log observer.

Text lines look like::

    10.0.0.7 "GET /debian/pool/main/h/hello/hello_2.10-3_amd64.deb" 200 53140 MISS
        upstream=0.084s time=0.412s route=debian agent="Debian APT-HTTP/1.3 (2.6.1)"

(on one line). Client-controlled text (the URL, the user agent) is escaped so that a line
can never be split or forged.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger

from pkgproxy.observe import Observer, RequestRecord

NAMESPACE = "pkgproxy.access"
_TEXT = (
    '{client} "{method} {uri}" {status} {bytes_sent} {cache} upstream={upstream} '
    'time={duration} route={route} agent="{user_agent}"{aborted}'
)


def escape(text: str) -> str:
    """Backslash-escape quotes, backslashes and control characters for a quoted field."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case, without a loop per character
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or "\x7f" <= c <= "\x9f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def record_fields(record: RequestRecord) -> dict[str, Any]:
    """The structured fields of one access-log line (the JSON object, too)."""
    return {
        "client": record.client,
        "method": record.method,
        "uri": record.uri,
        "status": record.status,
        "bytes": record.bytes_sent,
        "cache": record.cache or None,
        "route": record.route or None,
        "family": record.family or None,
        "upstream_seconds": (
            round(record.upstream_seconds, 6) if record.upstream_seconds is not None else None
        ),
        "duration_seconds": round(record.duration, 6),
        "user_agent": record.user_agent,
        "completed": record.completed,
    }


def format_text(record: RequestRecord) -> dict[str, str]:
    """The text line's fields, each already escaped and formatted."""
    upstream = record.upstream_seconds
    return {
        "client": escape(record.client),
        "method": escape(record.method),
        "uri": escape(record.uri),
        "status": str(record.status),
        "bytes_sent": str(record.bytes_sent),
        "cache": record.cache or "-",
        "upstream": f"{upstream:.3f}s" if upstream is not None else "-",
        "duration": f"{record.duration:.3f}s",
        "route": record.route or "-",
        "user_agent": escape(record.user_agent),
        "aborted": "" if record.completed else " ABORTED",
    }


class AccessLog(Observer):
    """Emits one ``info`` event per finished request in the ``pkgproxy.access`` namespace.

    :param json_lines: write each line as one JSON object instead of text.
    :param logger: where to emit (tests pass their own).
    """

    def __init__(self, json_lines: bool = False, logger: Logger | None = None) -> None:
        self._json = json_lines
        self.log = logger or Logger(namespace=NAMESPACE)

    def request_done(self, record: RequestRecord) -> None:
        fields = record_fields(record)
        if self._json:
            line = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
            self.log.info("{access_json}", access_json=line, access=fields)
        else:
            self.log.info(_TEXT, access=fields, **format_text(record))
