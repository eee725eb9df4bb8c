"""Rewriter costs: CPU that grows linearly, and a reactor that is never held for long.

Wall-clock and CPU measurements, moved out of the unit suite (which checks what the
rewriters write, not how fast): run them alone, on a quiet machine.

* ``pypi-linear``: pages built to make a scanner backtrack or re-read (an unterminated
  quote after many tags, endless ``<``, an attribute name of megabytes, an unclosed
  comment or script), at 1 MB and at 4 MB: four times the page must cost about four
  times the CPU of this thread (a quadratic scan costs sixteen). Limit: 8x + 0.2 s.
* ``pypi-large``: a 20 MB PyPI root list (340,000 links) rewritten in a worker thread
  while the main thread ticks every 2 ms: the longest gap between ticks (limit 0.5 s)
  and the whole rewrite (limit 60 s).
* ``npm-huge``: a 30 MB packument fetched through pkgproxy (real sockets, real disk
  pool, one reactor) from a local upstream, parsed, rewritten, stored, learned and
  served while a probe ticks every 5 ms on the reactor: the longest time the process
  held the reactor (limit 100 ms; a gap counts only for the CPU the process used in it).

    PYTHONPATH=. python3 docs/bench/rewrite.py [--scale S] [pypi-linear pypi-large npm-huge]

``--scale`` multiplies every size (0.05 for a quick check that the script runs). Prints
one line per measurement and exits 1 if a limit was exceeded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

from pkgproxy.config import config_from_dict
from pkgproxy.rewrite import pypi_simple
from pkgproxy.rewrite.context import RewriteContext
from pkgproxy.web.routing import RouteTable
from tests.support.pypirepo import pathological_pages

TABLE = RouteTable(config_from_dict({}).enabled_routes())
WORK = tempfile.mkdtemp(prefix="pkgproxy-bench-rewrite-")


def context(page_url: str) -> RewriteContext:
    return RewriteContext(page_url, lambda url: TABLE.public_url(url, "http://cache:3142"))


def _files(source: bytes) -> tuple[str, str]:
    raw = os.path.join(WORK, "page")
    with open(raw, "wb") as f:
        f.write(source)
    return raw, os.path.join(WORK, "out")


def pypi_linear(scale: float) -> bool:
    """CPU of this thread for each pathological page at 1x and 4x its size."""

    ok = True
    size = int(1_000_000 * scale)
    for small, large in zip(pathological_pages(size // 4), pathological_pages(size), strict=True):
        costs = []
        for page in (small, large):
            raw, out = _files(page)
            started = time.thread_time()
            pypi_simple.rewrite_simple(
                raw, out, context("https://pypi.org/simple/demo/"), want_json=False, root=False
            )
            costs.append(time.thread_time() - started)
        within = costs[1] < 8 * costs[0] + 0.2
        ok = ok and within
        print(
            f"pypi-linear {page[:12]!r}: {costs[0] * 1000:.0f} ms -> {costs[1] * 1000:.0f} ms "
            f"(x{costs[1] / max(costs[0], 1e-6):.1f}) {'ok' if within else 'NOT LINEAR'}"
        )
    return ok


def pypi_large(scale: float) -> bool:
    """A 20 MB root list rewritten in a thread: the main thread's longest wait."""
    lines = [b"<!DOCTYPE html>\n<html><body>\n"]
    size = n = 0
    while size < 20_000_000 * scale:
        line = b'    <a href="/simple/project-%07d/">project-%07d</a>\n' % (n, n)
        lines.append(line)
        size += len(line)
        n += 1
    lines.append(b"</body></html>\n")
    raw, out = _files(b"".join(lines))
    del lines
    errors: list[BaseException] = []

    def work() -> None:
        try:
            pypi_simple.rewrite_simple(
                raw, out, context("https://pypi.org/simple/"), want_json=False, root=True
            )
        except BaseException as e:
            errors.append(e)

    started = time.monotonic()
    worker = threading.Thread(target=work)
    worker.start()
    longest, last = 0.0, time.monotonic()
    while worker.is_alive() and time.monotonic() - started < 120:
        time.sleep(0.002)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    worker.join(10)
    elapsed = time.monotonic() - started
    with open(out, "rb") as f:
        rewritten = f.read().count(b'href="http://cache:3142/pypi/simple/project-')
    ok = not errors and rewritten == n and longest < 0.5 and elapsed < 60
    print(
        f"pypi-large {size / 1e6:.0f} MB, {n} links: {elapsed:.2f} s, main thread held "
        f"{longest * 1000:.0f} ms at most, {rewritten} rewritten {'ok' if ok else 'FAILED'}"
        + (f" {errors[0]!r}" if errors else "")
    )
    return ok


def npm_huge(scale: float) -> bool:
    """A 30 MB packument through pkgproxy while a probe watches the reactor."""
    from twisted.internet import reactor

    result: list[bool] = []
    outcome: list[Any] = []
    d = _npm_huge(reactor, scale, result)
    d.addBoth(lambda r: (outcome.append(r), reactor.stop()))
    if not outcome:
        reactor.run()
    if outcome and hasattr(outcome[0], "printTraceback"):
        outcome[0].printTraceback()
    return bool(result and result[0])


def _npm_huge(reactor: Any, scale: float, result: list[bool]) -> Any:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall

    from tests.integration.harness import (
        FakeUpstream,
        HTTPTestClient,
        ProxyUnderTest,
        response_head,
        sleep,
    )
    from tests.support import npmrepo

    class Probe:
        """Ticks every 5 ms; a late tick counts for the CPU the process used meanwhile."""

        def __init__(self) -> None:
            self.longest = self.longest_wall = 0.0
            self.ticks = 0
            self._last, self._last_cpu = time.monotonic(), time.process_time()
            self.loop = LoopingCall(self.tick)
            self.loop.clock = reactor

        def tick(self) -> None:
            now, cpu = time.monotonic(), time.process_time()
            wall = now - self._last
            self.longest_wall = max(self.longest_wall, wall)
            self.longest = max(self.longest, min(wall, cpu - self._last_cpu))
            self._last, self._last_cpu = now, cpu
            self.ticks += 1

    async def run() -> None:
        upstream = FakeUpstream()
        upstream.listen()
        doc = npmrepo.huge_packument(int(30_000_000 * scale), upstream.url("/"), name="huge")
        body = json.dumps(doc).encode()
        versions = len(doc["versions"])
        del doc
        gc.collect()

        def handle(request: Any, conn: Any) -> None:
            head = response_head(
                200,
                [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")],
            )
            conn.write(head + body)
            conn.done()

        upstream.handlers[b"/huge"] = handle
        config = config_from_dict(
            {
                "routes": {"npm": {"upstream": upstream.url("/")}},
                "cache": {"dir": os.path.join(WORK, "cache"), "max_size": "1GiB"},
            }
        )
        proxy = ProxyUnderTest(config)
        await proxy.start()
        client = HTTPTestClient()
        probe = Probe()
        probe.loop.start(0.005, now=False)
        started = time.monotonic()
        try:
            got = await client.get(proxy.url("/npm/huge"), timeout=100)
            await proxy.settled(60)
            await proxy.no_temp_files(30)
            deadline = time.monotonic() + 60
            while len(proxy.learner.facts) < versions and time.monotonic() < deadline:
                await sleep(0.05)
            elapsed = time.monotonic() - started
        finally:
            probe.loop.stop()
            await client.close()
            await proxy.stop()
            await upstream.stop()
        served = got.status == 200 and got.error is None
        learned = len(proxy.learner.facts) == versions
        ok = served and learned and probe.ticks > 10 and probe.longest < 0.1
        print(
            f"npm-huge {len(body) / 1e6:.0f} MB, {versions} versions: {elapsed:.2f} s, reactor "
            f"held {probe.longest * 1000:.0f} ms at most (wall gap "
            f"{probe.longest_wall * 1000:.0f} ms, {probe.ticks} ticks), served {served}, "
            f"learned {learned} {'ok' if ok else 'FAILED'}"
        )
        result.append(ok)

    return Deferred.fromCoroutine(run())


CHECKS = {"pypi-linear": pypi_linear, "pypi-large": pypi_large, "npm-huge": npm_huge}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("checks", nargs="*", help=", ".join(CHECKS) + " (default: all)")
    args = parser.parse_args()
    names = args.checks or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check {unknown[0]!r}: one of {', '.join(CHECKS)}")
    results = [CHECKS[name](args.scale) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
