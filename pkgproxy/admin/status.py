"""The status page at ``/_pkgproxy/``: one self-contained HTML document.

Rendered on the server from a :class:`StatusView` snapshot, with inline CSS and no script
or external asset, so it works on an appliance VM with no internet and under a strict
Content-Security-Policy. Everything that reaches the page from outside (URLs, error
messages, configuration values) goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass

from pkgproxy.admin.metrics import (
    CACHE_RESULTS,
    NO_CACHE,
    ErrorRecord,
    FamilyStats,
    RouteUsage,
    WarmupStats,
)
from pkgproxy.config.model import Config

#: The page reloads itself this often (seconds); a meta refresh needs no script.
REFRESH_SECONDS = 15
#: Content-Security-Policy of admin pages: inline styles only, nothing loaded, no script.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


@dataclass(frozen=True)
class DownloadView:
    """One upstream download in progress."""

    key: str
    url: str
    route: str
    written: int
    length: int | None
    subscribers: int
    age: float


@dataclass(frozen=True)
class StatusView:
    """Everything the page shows, taken at one moment."""

    version: str
    now: float
    uptime: float
    ready: bool
    offline: bool
    cache_dir: str
    cache_bytes: int
    cache_max: int
    cache_entries: int
    evictions: int
    usage: Sequence[RouteUsage]
    families: Sequence[FamilyStats]
    downloads: Sequence[DownloadView]
    errors: Sequence[ErrorRecord]
    config_text: str
    base_url: str
    token_required: bool
    warmups: Sequence[WarmupStats] = ()
    #: This node's name (``node_name``): which member of a cluster the page is from.
    node: str = ""


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, as the configuration takes them."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``3725`` -> ``1 h 2 min``: the two largest units are enough for a glance."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "min")]
    while parts and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n} {u}" for n, u in parts[:2] if n) or "0 s"


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _pct(part: float, whole: float) -> float:
    return 0.0 if whole <= 0 else max(0.0, min(100.0, 100.0 * part / whole))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _bar(percent: float, tone: str = "") -> str:
    cls = f"bar {tone}".strip()
    return f'<div class="{cls}"><span style="width:{percent:.1f}%"></span></div>'


def _table(headers: Iterable[tuple[str, str]], rows: list[str], empty: str) -> str:
    """A table whose header cells are ``(label, css class)``; ``empty`` when no rows."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f'<th class="{cls}">{_e(label)}</th>' for label, cls in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def config_text(config: Config) -> str:
    """The effective configuration as TOML, with the admin token replaced by a mark."""
    lines = [
        f"listen = {_toml(list(config.listen))}",
        f"admin_networks = {_toml(list(config.admin_networks))}",
        f"trusted_proxies = {_toml(list(config.trusted_proxies))}",
        f"node_name = {_toml(config.node_name)}",
    ]
    if config.admin_token is not None:
        lines.append('admin_token = "(set, not shown)"')
    lines.append(f"offline = {_toml(config.offline)}")
    for name in ("access_log", "cache", "limits", "upstream"):
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(_toml_fields(getattr(config, name)))
    for route in config.routes:
        lines.append("")
        lines.append(f"[routes.{route.name}]")
        lines.extend(_toml_fields(route, skip=("name",)))
    return "\n".join(lines) + "\n"


def _toml_fields(obj: object, skip: tuple[str, ...] = ()) -> list[str]:
    assert is_dataclass(obj)
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value is None:
            continue
        out.append(f"{f.name} = {_toml(value)}")
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def render_status(view: StatusView) -> str:
    """The whole status page."""
    used_pct = _pct(view.cache_bytes, view.cache_max)
    tone = "bad" if used_pct >= 95 else "warn" if used_pct >= 85 else ""
    total_cache = sum(f.cache_requests for f in view.families)
    total_hits = sum(f.hits for f in view.families)
    served = sum(f.served for f in view.families)
    saved = sum(f.saved for f in view.families)
    errors = sum(f.upstream_errors for f in view.families)
    rejected = sum(f.verification_failures for f in view.families)
    ratio = f"{100 * total_hits / total_cache:.1f}%" if total_cache else "–"
    pills = [
        '<span class="pill ok">ready</span>'
        if view.ready
        else '<span class="pill warn">starting: cache recovering</span>',
        '<span class="pill warn">offline mode</span>'
        if view.offline
        else '<span class="pill ok">online</span>',
    ]
    cards = [
        _card(
            "Cache",
            human_bytes(view.cache_bytes),
            f"of {human_bytes(view.cache_max)} ({used_pct:.1f}%)",
            _bar(used_pct, tone),
            f"{_count(view.cache_entries, 'entry', 'entries')} · {view.evictions:,} evicted",
        ),
        _card(
            "Hit ratio",
            ratio,
            f"{total_hits:,} of {total_cache:,} requests",
            _bar(100 * total_hits / total_cache if total_cache else 0, "ok"),
            "served without a download of their own",
        ),
        _card(
            "Bytes saved",
            human_bytes(saved),
            f"of {human_bytes(served)} served",
            _bar(_pct(saved, served), "ok"),
            "served minus fetched from upstreams",
        ),
        _card(
            "Upstream",
            f"{len(view.downloads)} downloading",
            f"{_count(errors, 'error')} · {rejected:,} failed verification",
            "",
            f"up {human_duration(view.uptime)}",
        ),
    ]
    return _PAGE.format(
        refresh=REFRESH_SECONDS,
        version=_e(view.version),
        node=_e(view.node),
        pills="".join(pills),
        cache_dir=_e(view.cache_dir),
        cards="".join(cards),
        families=_families(view.families),
        usage=_usage(view.usage, view.cache_bytes),
        downloads=_downloads(view.downloads),
        warmups=_warmups(view.warmups, view.now),
        errors=_errors(view.errors, view.now),
        config=_e(view.config_text),
        actions=_actions(view.base_url, view.token_required),
        generated=_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.now))),
        style=_STYLE,
    )


def _card(title: str, big: str, sub: str, bar: str, foot: str) -> str:
    return (
        f'<div class="card stat"><h3>{_e(title)}</h3><div class="big">{_e(big)}</div>'
        f'<div class="sub">{_e(sub)}</div>{bar}<div class="foot">{_e(foot)}</div></div>'
    )


def _families(families: Sequence[FamilyStats]) -> str:
    rows = []
    for f in families:
        ratio = f.hit_ratio
        ratio_cell = (
            f'<div class="ratio">{_bar(100 * ratio, "ok")}<span>{100 * ratio:.1f}%</span></div>'
            if ratio is not None
            else '<span class="muted">–</span>'
        )
        order = {r: i for i, r in enumerate((*CACHE_RESULTS, NO_CACHE))}
        by_result = " · ".join(
            f"{n:,} {_e(result)}"
            for result, n in sorted(f.requests.items(), key=lambda kv: order.get(kv[0], 99))
            if n
        )
        rows.append(
            f"<tr><td><b>{_e(f.family)}</b></td>"
            f'<td class="num">{sum(f.requests.values()):,}</td>'
            f"<td>{ratio_cell}</td>"
            f'<td class="num">{human_bytes(f.served)}</td>'
            f'<td class="num">{human_bytes(f.fetched)}</td>'
            f'<td class="num good">{human_bytes(f.saved)}</td>'
            f'<td class="small muted">{by_result}</td></tr>'
        )
    headers = [
        ("Family", ""),
        ("Requests", "num"),
        ("Hit ratio", "w-ratio"),
        ("Served", "num"),
        ("Fetched", "num"),
        ("Saved", "num"),
        ("By result", ""),
    ]
    return _table(headers, rows, "No requests yet.")


def _usage(usage: Sequence[RouteUsage], total: int) -> str:
    rows = [
        f'<tr><td class="name"><b>{_e(u.route)}</b></td><td>{_e(u.family or "–")}</td>'
        f'<td class="num">{u.entries:,}</td><td class="num">{human_bytes(u.bytes)}</td>'
        f'<td class="w-share">{_bar(_pct(u.bytes, total))}</td></tr>'
        for u in sorted(usage, key=lambda u: -u.bytes)
    ]
    headers = [("Route", ""), ("Family", ""), ("Entries", "num"), ("Size", "num"), ("Share", "")]
    return _table(headers, rows, "The cache is empty.")


def _downloads(downloads: Sequence[DownloadView]) -> str:
    rows = []
    for d in sorted(downloads, key=lambda d: -d.age):
        if d.length:
            pct = _pct(d.written, d.length)
            progress = (
                f'<div class="ratio">{_bar(pct)}<span>{pct:.0f}%</span></div>'
                f'<div class="small muted">{human_bytes(d.written)} of '
                f"{human_bytes(d.length)}</div>"
            )
        else:
            progress = f'<span class="small">{human_bytes(d.written)} so far</span>'
        rows.append(
            f'<tr><td class="nowrap"><b>{_e(d.route)}</b></td>'
            f'<td><div class="url" title="{_e(d.url)}">{_e(d.url)}</div></td>'
            f'<td class="w-progress">{progress}</td>'
            f'<td class="num">{d.subscribers}</td>'
            f'<td class="num">{human_duration(d.age)}</td></tr>'
        )
    headers = [
        ("Route", ""),
        ("Upstream URL", ""),
        ("Progress", ""),
        ("Clients", "num"),
        ("Running", "num"),
    ]
    return _table(headers, rows, "No downloads in progress.")


#: A warm-up with no request for this long is shown as finished.
WARMUP_IDLE_SECONDS = 30.0


def _warmups(warmups: Sequence[WarmupStats], now: float) -> str:
    rows = []
    for w in warmups:
        idle = now - w.last
        state = (
            '<span class="pill ok small">running</span>'
            if idle < WARMUP_IDLE_SECONDS
            else f'<span class="small muted">finished {human_duration(idle)} ago</span>'
        )
        rows.append(
            f'<tr><td><div class="url" title="{_e(w.tag)}">{_e(w.tag)}</div></td>'
            f"<td>{state}</td>"
            f'<td class="num">{w.requests:,}</td>'
            f'<td class="num">{w.fetched:,}</td>'
            f'<td class="num">{w.cached:,}</td>'
            f'<td class="num">{w.failed:,}</td>'
            f'<td class="num">{human_bytes(w.bytes)}</td>'
            f'<td class="num">{human_duration(w.last - w.started)}</td></tr>'
        )
    headers = [
        ("Warm-up", ""),
        ("State", ""),
        ("Requests", "num"),
        ("Fetched", "num"),
        ("Cached", "num"),
        ("Failed", "num"),
        ("Served", "num"),
        ("Took", "num"),
    ]
    return _table(headers, rows, "No warm-up in the last hour.")


def _errors(errors: Sequence[ErrorRecord], now: float) -> str:
    rows = [
        f'<tr><td class="small nowrap">{_clock(e.at)}<div class="muted">'
        f"{human_duration(now - e.at)} ago</div></td>"
        f'<td class="nowrap"><b>{_e(e.route)}</b></td>'
        f'<td><span class="pill bad small">{_e(e.kind)}</span></td>'
        f'<td><div class="url" title="{_e(e.url)}">{_e(e.url)}</div>'
        f'<div class="small muted msg">{_e(e.message)}</div></td></tr>'
        for e in errors
    ]
    headers = [("Time (UTC)", ""), ("Route", ""), ("Kind", ""), ("What failed", "")]
    return _table(headers, rows, "No upstream errors since start.")


def _actions(base: str, token: bool) -> str:
    auth = " -H 'Authorization: Bearer $TOKEN'" if token else ""
    lines = [
        f"curl -X POST{auth} '{base}/_pkgproxy/admin/offline?enabled=true'",
        f"curl -X POST{auth} '{base}/_pkgproxy/admin/offline?enabled=false'",
        f"curl -X POST{auth} '{base}/_pkgproxy/admin/purge?path=/debian/dists/bookworm/InRelease'",
        f"curl -X POST{auth} '{base}/_pkgproxy/admin/purge?prefix=debian:dists/'",
    ]
    return _e("\n".join(lines))


_STYLE = """
:root{--bg:#f3f5f9;--card:#fff;--ink:#1b2333;--muted:#687385;--line:#e3e8ef;--bar:#e8edf4;
--accent:#3566e8;--ok:#17a864;--warn:#e8900c;--bad:#e0483e;--code:#f6f8fb}
@media (prefers-color-scheme:dark){:root{--bg:#0e131d;--card:#161d2a;--ink:#e5e9f0;
--muted:#97a1b3;--line:#263045;--bar:#232c3d;--code:#111826}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{background:linear-gradient(100deg,#1c2f6b,#3566e8);color:#fff;padding:18px 0}
.wrap{max-width:1240px;margin:0 auto;padding:0 28px}
header .wrap{display:flex;align-items:center;gap:14px;flex-wrap:wrap}
header h1{margin:0;font-size:21px;font-weight:700;letter-spacing:.3px}
header .ver{opacity:.75;font-size:13px}
header .node{font-weight:600;font-size:14px}
header .dir{margin-left:auto;opacity:.8;font-size:12.5px;font-family:ui-monospace,
"DejaVu Sans Mono",monospace}
.logo{width:30px;height:30px;border-radius:8px;background:rgba(255,255,255,.16);
display:grid;place-items:center;font-weight:800}
main.wrap{padding-top:22px;padding-bottom:30px;display:grid;gap:18px}
main.wrap>*,.grid2>*{min-width:0}
.cards{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:16px}
@media (max-width:900px){.cards{grid-template-columns:repeat(2,minmax(0,1fr))}}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;
padding:16px 18px;box-shadow:0 1px 2px rgba(16,24,40,.05);overflow-x:auto}
.card h2{margin:0 0 10px;font-size:15px}
.stat h3{margin:0;font-size:12px;text-transform:uppercase;letter-spacing:.06em;
color:var(--muted);font-weight:650}
.stat .big{font-size:27px;font-weight:700;margin:4px 0 0;font-variant-numeric:tabular-nums}
.stat .sub{color:var(--muted);font-size:13px;margin-bottom:10px}
.stat .foot{color:var(--muted);font-size:12px;margin-top:8px}
.bar{height:8px;background:var(--bar);border-radius:99px;overflow:hidden;min-width:60px}
.bar span{display:block;height:100%;background:var(--accent);border-radius:99px}
.bar.ok span{background:var(--ok)}.bar.warn span{background:var(--warn)}
.bar.bad span{background:var(--bad)}
.ratio{display:flex;align-items:center;gap:8px}.ratio .bar{flex:1}
.ratio span{font-variant-numeric:tabular-nums;font-size:12.5px;min-width:44px}
.grid2{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:18px}
@media (max-width:1000px){.grid2{grid-template-columns:1fr}}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
tbody tr:last-child td{border-bottom:0}
th{color:var(--muted);font-size:11.5px;text-transform:uppercase;letter-spacing:.05em;
font-weight:650}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.w-ratio{width:170px}.w-share{width:140px}.w-progress{width:200px}
.good{color:var(--ok);font-weight:600}
.muted{color:var(--muted)}.small{font-size:12px}.empty{color:var(--muted);margin:6px 0}
.url{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px;
max-width:640px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.grid2 .url{max-width:340px}.nowrap{white-space:nowrap}.name{overflow-wrap:anywhere}
.msg{white-space:normal;word-break:break-word}
.pill{display:inline-block;padding:2px 10px;border-radius:99px;font-size:12px;font-weight:650;
background:rgba(255,255,255,.18);color:#fff}
header .pill.ok{background:#1f9d63}header .pill.warn{background:#e8900c}
td .pill.bad{background:rgba(224,72,62,.13);color:var(--bad);padding:1px 8px}
pre{margin:0;background:var(--code);border:1px solid var(--line);border-radius:8px;
padding:12px 14px;overflow:auto;font:12.5px/1.5 ui-monospace,"DejaVu Sans Mono",monospace;
max-height:420px}
details summary{cursor:pointer;font-weight:650}
footer{color:var(--muted);font-size:12px;text-align:center;padding-bottom:20px}
footer a{color:var(--accent);text-decoration:none;margin:0 6px}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{refresh}">
<title>pkgproxy status</title>
<style>{style}</style>
</head>
<body>
<header><div class="wrap">
<div class="logo">p</div><h1>pkgproxy</h1><span class="ver">{version}</span>
<span class="node" title="node_name">{node}</span>{pills}
<span class="dir">{cache_dir}</span>
</div></header>
<main class="wrap">
<div class="cards">{cards}</div>
<section class="card"><h2>Families</h2>{families}</section>
<section class="card"><h2>Downloads in progress</h2>{downloads}</section>
<section class="card"><h2>Warm-ups (pkgproxy-warm)</h2>{warmups}</section>
<section class="card"><h2>Cache by route</h2>{usage}</section>
<section class="card"><h2>Recent upstream errors</h2>{errors}</section>
<div class="grid2">
<section class="card"><details><summary>Effective configuration</summary>
<pre>{config}</pre></details></section>
<section class="card"><details><summary>Admin actions</summary>
<pre>{actions}</pre></details></section>
</div>
</main>
<footer>Generated {generated} · refreshes every {refresh} s ·
<a href="/_pkgproxy/metrics">metrics</a>·<a href="/_pkgproxy/health">health</a>·<a
href="/_pkgproxy/ready">ready</a></footer>
</body>
</html>
"""
