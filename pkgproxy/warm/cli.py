"""``pkgproxy-warm SERVER FILE...``: the command line, progress and summary."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from pkgproxy import __version__
from pkgproxy.config import ConfigError, load_config
from pkgproxy.warm.runner import Context, Outcome, Server, WarmError, plan, run_tasks
from pkgproxy.warm.sources import FAMILIES, SourceError, read

#: The User-Agent product every warm-up request carries; the status page groups by it.
AGENT_PRODUCT = "pkgproxy-warm"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pkgproxy-warm",
        description="Fill a running pkgproxy from lock files and package lists, through "
        "its own routes: pages and indexes first, then every file they pin.",
        epilog="Files: requirements.txt with --hash pins, uv.lock, poetry.lock, pylock.toml; "
        "package-lock.json, npm-shrinkwrap.json, yarn.lock (v1), pnpm-lock.yaml; a Debian "
        "package list ('bookworm amd64 curl git' a line, or dpkg --get-selections output "
        "with --suite and --arch); an image list (one reference a line). Give --family for a "
        "file whose name does not tell (package lists and image lists always).",
    )
    p.add_argument("server", help="the server's base URL, e.g. http://cache.example:3142")
    p.add_argument("files", nargs="+", metavar="FILE", help="lock files and lists to read")
    p.add_argument(
        "--family", choices=FAMILIES, help="what the FILEs are, where the name does not tell"
    )
    p.add_argument("--config", help="the server's configuration file (for renamed or moved routes)")
    p.add_argument("--jobs", type=int, default=8, help="requests at a time (default 8)")
    p.add_argument(
        "--dry-run", action="store_true", help="read pages and indexes, list what would be fetched"
    )
    p.add_argument(
        "--platform", default="linux/amd64", help="images: OS/ARCH[/VARIANT] (default linux/amd64)"
    )
    p.add_argument("--suite", help="Debian: the suite of a dpkg --get-selections list")
    p.add_argument("--arch", help="Debian: the architecture of a dpkg --get-selections list")
    p.add_argument(
        "--components", default="main", help="Debian: components, comma-separated (default main)"
    )
    p.add_argument("--keyring", help="Debian: the archive keyring apt checks the indexes with")
    p.add_argument(
        "--route", action="append", default=[], metavar="FAMILY=NAME",
        help="use the route NAME for FAMILY (default: the route named like the family)",
    )  # fmt: skip
    p.add_argument("--tag", help="the name the status page shows this warm-up under")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    return p


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """A progress bar on a terminal (tqdm), else one line a file."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.bar: Any = None
        if err.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=0, unit="file", file=err, dynamic_ncols=True)
        self.bytes = 0
        self.started = time.monotonic()

    def planned(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.total += n
            self.bar.refresh()

    def outcome(self, o: Outcome) -> None:
        if o.state == "page":
            return
        self.bytes += o.size
        if self.bar is not None:
            self.bar.update(1)
            rate = self.bytes / max(1e-3, time.monotonic() - self.started)
            self.bar.set_postfix_str(f"{human(self.bytes)}, {human(rate)}/s, {o.label[:40]}")
            if o.state == "failed":
                self.bar.write(f"failed  {o.label}: {o.reason}")
            return
        if o.state == "failed":
            self.out.write(f"failed   {o.label}: {o.reason}\n")
        else:
            cache = f" {o.cache}" if o.cache else ""
            self.out.write(f"{o.state:8} {human(o.size):>10}  {o.path}{cache}\n")
        self.out.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``pkgproxy-warm`` console script."""
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        routes = dict(r.split("=", 1) for r in args.route if "=" in r)
        if len(routes) != len(args.route):
            raise WarmError("--route takes FAMILY=NAME")
        wants = []
        for path in args.files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise WarmError(f"{path}: {e.strerror}") from None
            wants += read(path, text, args.family)
        tag = args.tag or f"{socket.gethostname()}:{os.getpid()}"
        server = Server(
            args.server,
            config.routes,
            user_agent=f"{AGENT_PRODUCT}/{__version__} ({tag})",
            timeout=args.timeout,
        )
        tasks = plan(wants, suite=args.suite, architecture=args.arch)
    except (ConfigError, SourceError, WarmError) as e:
        print(f"pkgproxy-warm: {e}", file=sys.stderr)
        return 2
    progress = Progress(out, sys.stderr)
    ctx = Context(
        server,
        dry_run=args.dry_run,
        platform=args.platform,
        keyring=args.keyring,
        components=tuple(c for c in args.components.split(",") if c),
        routes=routes,
        on_outcome=progress.outcome,
        on_planned=progress.planned,
    )
    started = time.monotonic()
    report = run_tasks(tasks, ctx, args.jobs)
    progress.close()
    took = time.monotonic() - started
    verb = "would fetch" if args.dry_run else "fetched"
    count = report.count("planned" if args.dry_run else "fetched")
    size = report.bytes("planned" if args.dry_run else "fetched")
    out.write(
        f"pkgproxy-warm: {verb} {count} files ({human(size)}), "
        f"{report.count('cached')} already cached, {len(report.failed)} failed, "
        f"{report.count('page')} pages read, in {took:.1f} s\n"
    )
    for o in report.failed:
        print(f"pkgproxy-warm: failed: {o.label}: {o.reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
