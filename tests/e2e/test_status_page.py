"""The operations surface of a real ``twistd -n pkgproxy``: status page, metrics, log, admin.

* The status page is loaded by headless Chromium (Debian's ``chromium``), while a download
  is in progress, and its screenshot must be a real rendering: the right size, the page's
  dark header band over a light body, and many distinct colours (text, bars, pills). The
  PNG is decoded with the standard library only.
* The JSON access log, metrics over HTTP and the token-protected offline switch are
  checked on the same kind of process an operator runs.

Everything listens on 127.0.0.1; every process is stopped by a cleanup.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
import zlib

from twisted.trial.unittest import SkipTest, TestCase

from tests.support.procs import HOST, clean_env, file_tree, free_port, start_pkgproxy
from tests.support.slowserver import SlowServer, start_slow_server

WIDTH, HEIGHT = 1280, 900
#: Bound on Chromium taking one screenshot (it usually needs 1-3 s).
CHROMIUM_TIMEOUT = 90.0
HTTP_TIMEOUT = 10.0
TOKEN = "e2e-admin-token-0123456789abcdef"


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or a ``chromium-browser`` elsewhere), if installed."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(url: str, png: str, profile: str, timeout: float = CHROMIUM_TIMEOUT) -> str:
    """Take a WIDTHxHEIGHT screenshot of ``url`` with headless Chromium; return its output.

    Chromium runs in its own process group, which is killed on timeout or at the end, so
    no renderer or zygote outlives the test.
    """
    chromium = find_chromium()
    assert chromium is not None
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        f"--window-size={WIDTH},{HEIGHT}",
        url,
    ]
    env = clean_env({"HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile})
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"chromium took longer than {timeout} s:\n{out.decode()[-3000:]}"
        ) from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out.decode("utf-8", "replace")


#: For each element of the page that draws a box (the cards), its title and whether its
#: content is wider than the box (then cut off or scrolled out of sight). The page's CSP
#: allows no script; the DevTools protocol evaluates this outside the page's rules.
_OVERFLOW_JS = """JSON.stringify([
  ...[...document.querySelectorAll('.card')].map(c => [
    (c.querySelector('h2, h3, summary') || c).textContent.trim(), c.scrollWidth, c.clientWidth]),
  ['page', document.documentElement.scrollWidth, window.innerWidth]])"""


class DevTools:
    """Headless Chromium on ``--remote-debugging-pipe``: the DevTools protocol as JSON
    messages ending in NUL on the child's descriptors 3 (in) and 4 (out), so no
    WebSocket client is needed. Stop it with :meth:`close` (the whole process group)."""

    def __init__(self, url: str, profile: str) -> None:
        chromium = find_chromium()
        assert chromium is not None
        child_in, self._to_child = os.pipe()
        self._from_child, child_out = os.pipe()
        # Above 4, so that placing them at 3 and 4 in the child overwrites neither.
        child_in = fcntl.fcntl(child_in, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(child_out, fcntl.F_DUPFD, 10)

        def place() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        argv = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--remote-debugging-pipe", f"--window-size={WIDTH},{HEIGHT}", url,
        ]  # fmt: skip
        env = clean_env({"HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile})
        self.proc = subprocess.Popen(
            argv,
            pass_fds=(3, 4),
            preexec_fn=place,  # noqa: PLW1509 (no threads start Chromium)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command; return its result (events in between are dropped)."""
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + CHROMIUM_TIMEOUT
        while True:
            while b"\0" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\0")
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    return dict(answer["result"])
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"chromium did not answer {method} in {CHROMIUM_TIMEOUT} s")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 65536)
                if not chunk:
                    raise AssertionError(f"chromium exited during {method}")
                self._buffer += chunk

    def evaluate_loaded(self, url: str, expression: str) -> object:
        """``expression``'s value in the page once ``url`` has loaded."""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = self.call(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}
        )["sessionId"]

        def value(js: str) -> object:
            params = {"expression": js, "returnByValue": True}
            return self.call("Runtime.evaluate", params, session)["result"].get("value")

        deadline = time.monotonic() + CHROMIUM_TIMEOUT
        while value("location.href + ' ' + document.readyState") != f"{url} complete":
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not load in {CHROMIUM_TIMEOUT} s")
            time.sleep(0.1)
        return value(expression)

    def close(self) -> None:
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """Decode an 8-bit RGB or RGBA PNG: ``(width, height, rows, bytes per pixel)``."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {color}")
    bpp = 4 if color == 6 else 3
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def pixel(rows: list[bytes], bpp: int, x: int, y: int) -> tuple[int, int, int]:
    r, g, b = rows[y][x * bpp : x * bpp + 3]
    return r, g, b


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    """One request with no proxy from the environment; ``(status, body)``, errors too."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class StatusPageScreenshotTests(TestCase):
    """Headless Chromium renders the status page of a busy pkgproxy, fitting 1280 px."""

    def setUp(self) -> None:
        if find_chromium() is None:
            raise SkipTest("chromium is not installed (apt-get install chromium)")
        root = file_tree(
            self,
            {
                "files/small.txt": b"small file\n" * 100,
                "files/big.iso": os.urandom(64 * 1024) * 48,  # 3 MiB at 150 kB/s: about 20 s
            },
        )
        self.upstream = start_slow_server(self, root, rate=150_000)
        dead = free_port()  # nothing listens there: an upstream error for the page
        self.proxy = start_pkgproxy(
            self,
            f"""
[routes.ubuntu-ports-files]
family = "generic"
immutable = true
prefix = "/files/"
upstream = "{self.upstream.url("/files/")}"

[routes.mirror]
family = "generic"
upstream = "http://{HOST}:{dead}/"
""",
        )

    def hold_download(self, path: str) -> socket.socket:
        """Start a GET of ``path`` and read only its first bytes: a download in progress."""
        sock = socket.create_connection((HOST, self.proxy.port), timeout=HTTP_TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 200"))
        return sock

    def test_screenshot(self) -> None:
        """The page renders in Chromium at full size with its header, cards and content."""
        base = self.proxy.url("")
        self.assertEqual(get(base + "/files/small.txt")[0], 200)
        self.assertEqual(get(base + "/files/small.txt")[0], 200)
        self.assertEqual(get(base + "/mirror/tool.tar.gz")[0], 502)
        self.hold_download("/files/big.iso")
        deadline = time.monotonic() + 20
        while True:
            status, page = get(base + "/_pkgproxy/")
            if b"/files/big.iso" in page or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(status, 200)
        for text in (b"Downloads in progress", b"/files/big.iso", b"Recent upstream errors"):
            self.assertIn(text, page)

        png = os.path.abspath(self.mktemp()) + ".png"
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        output = screenshot(base + "/_pkgproxy/", png, profile)
        self.assertTrue(os.path.exists(png), f"no screenshot; chromium said:\n{output[-3000:]}")
        with open(png, "rb") as f:
            width, height, rows, bpp = decode_png(f.read())
        self.assertEqual((width, height), (WIDTH, HEIGHT))
        # The header band is dark blue, the body below it light; nothing is blank.
        r, g, b = pixel(rows, bpp, 8, 8)
        self.assertTrue(b > 80 and b > r + 30 and r + g + b < 450, (r, g, b))
        r, g, b = pixel(rows, bpp, 8, 300)
        self.assertGreater(r + g + b, 600, (r, g, b))
        colours = {
            rows[y][x : x + 3] for y in range(0, HEIGHT, 3) for x in range(0, WIDTH * bpp, bpp)
        }
        self.assertGreater(len(colours), 50)
        # Text was drawn in the card area, not just flat boxes.
        dark = sum(
            1 for y in range(100, 400) for x in range(40, 640) if sum(pixel(rows, bpp, x, y)) < 200
        )
        self.assertGreater(dark, 500)

    def test_nothing_overflows_at_1280(self) -> None:
        """Every card holds its table: nothing cut off or scrolled away, no page scroll.

        (Found failing: "Cache by route" shared a row with the errors, and its table,
        499 px with a route name as long as ``ubuntu-ports-files``, was cut off at
        430 px: its sizes and shares were out of sight.)
        """
        base = self.proxy.url("")
        for path in ("/files/small.txt", "/files/small.txt", "/mirror/tool.tar.gz"):
            get(base + path)
        self.hold_download("/files/big.iso")
        url = base + "/_pkgproxy/"
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        browser = DevTools(url, profile)
        self.addCleanup(browser.close)
        found = browser.evaluate_loaded(url, _OVERFLOW_JS)
        assert isinstance(found, str)
        boxes = json.loads(found)
        titles = [title for title, _, _ in boxes]
        for title in ("Cache by route", "Recent upstream errors", "Families", "page"):
            self.assertIn(title, titles)
        wider = [(title, content, box) for title, content, box in boxes if content > box]
        self.assertEqual(wider, [], f"content wider than its box (title, content, box): {boxes}")


def files_upstream(case: TestCase) -> tuple[str, SlowServer]:
    """A directory with ``files/a.txt`` (1234 bytes), served by a local upstream."""
    root = file_tree(case, {"files/a.txt": b"a" * 1234})
    return root, start_slow_server(case, root, rate=50_000_000)


class AccessLogFileTests(TestCase):
    """``[access_log] file``: lines written in batches to a file of their own."""

    def test_lines_reach_the_file_and_survive_rotation(self) -> None:
        root, upstream = files_upstream(self)
        path = os.path.join(root, "access.log")
        proxy = start_pkgproxy(
            self,
            f"""
[access_log]
file = "{path}"

[routes.files]
family = "generic"
immutable = true
upstream = "{upstream.url("/files/")}"
""",
        )
        base = proxy.url("")

        def mine(name: str) -> list[str]:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if os.path.exists(name):
                    with open(name, encoding="utf-8") as f:
                        lines = [line for line in f if 'agent="e2e' in line]
                    if lines:
                        return lines
                time.sleep(0.1)
            return []

        for _ in range(3):  # a miss, a hit, then a hit replayed by the hit path
            self.assertEqual(get(base + "/files/a.txt", {"User-Agent": "e2e"})[0], 200)
            time.sleep(0.2)  # the first one's commit
        lines = mine(path)
        deadline = time.monotonic() + 5
        while len(lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            lines = mine(path)
        self.assertEqual(len(lines), 3, lines)
        self.assertIn('"GET /files/a.txt" 200 1234 MISS', lines[0])
        self.assertIn('"GET /files/a.txt" 200 1234 HIT', lines[2])
        with open(proxy.log_path, encoding="utf-8") as f:
            self.assertNotIn("[pkgproxy.access#info]", f.read())

        os.rename(path, path + ".1")  # logrotate
        self.assertEqual(get(base + "/files/a.txt", {"User-Agent": "e2e-2"})[0], 200)
        self.assertEqual(len(mine(path)), 1)


class OperationsTests(TestCase):
    """JSON access log, metrics and the admin token on a real pkgproxy process."""

    def setUp(self) -> None:
        _, self.upstream = files_upstream(self)
        self.proxy = start_pkgproxy(
            self,
            f"""
admin_token = "{TOKEN}"

[access_log]
format = "json"

[routes.files]
family = "generic"
immutable = true
upstream = "{self.upstream.url("/files/")}"
""",
        )
        self.base = self.proxy.url("")

    def access_lines(self) -> list[dict[str, object]]:
        with open(self.proxy.log_path, encoding="utf-8") as f:
            lines = [line for line in f if "[pkgproxy.access#info] " in line]
        return [json.loads(line.split("[pkgproxy.access#info] ", 1)[1]) for line in lines]

    def test_json_access_log(self) -> None:
        """Each request is one JSON line in twistd's log, and Twisted adds no line of its own."""
        before = len(self.access_lines())  # the readiness probes
        self.assertEqual(get(self.base + "/files/a.txt", {"User-Agent": "e2e"})[0], 200)
        self.assertEqual(get(self.base + "/files/a.txt", {"User-Agent": "e2e"})[0], 200)
        deadline = time.monotonic() + 10
        while len(self.access_lines()) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        mine = [e for e in self.access_lines() if e["user_agent"] == "e2e"]
        self.assertEqual(
            [(e["status"], e["bytes"]) for e in mine], [(200, 1234), (200, 1234)], mine
        )
        # The second may still find the first's fetch committing: then it is coalesced.
        self.assertEqual(mine[0]["cache"], "MISS")
        self.assertIn(mine[1]["cache"], ("HIT", "COALESCED"))
        self.assertEqual(mine[0]["client"], HOST)
        self.assertIsInstance(mine[0]["upstream_seconds"], float)
        with open(self.proxy.log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertNotIn('"GET /files/a.txt HTTP/1.1" 200', log)  # Twisted's combined log

    def test_metrics_and_admin(self) -> None:
        """Metrics answer loopback; offline needs the token and then stops upstream fetches."""
        get(self.base + "/files/a.txt")
        status, body = get(self.base + "/_pkgproxy/metrics")
        self.assertEqual(status, 200)
        self.assertIn(
            b'pkgproxy_requests_total{cache="miss",code="2xx",family="generic",route="files"} 1.0',
            body,
        )
        url = self.base + "/_pkgproxy/admin/offline?enabled=true"
        self.assertEqual(get(url, method="POST")[0], 403)
        status, body = get(url, {"Authorization": f"Bearer {TOKEN}"}, method="POST")
        self.assertEqual((status, json.loads(body)), (200, {"offline": True}))
        self.assertEqual(get(self.base + "/files/a.txt")[0], 200)  # cached: served
        status, body = get(self.base + "/files/other.txt")
        self.assertEqual(status, 503)
        self.assertIn(b"offline mode", body)
        self.assertEqual(self.upstream.requests("/files/other.txt"), 0)

    def test_body_cap_on_a_socket(self) -> None:
        """A large request body is refused with 413 before it is read."""
        conn = http.client.HTTPConnection(HOST, self.proxy.port, timeout=HTTP_TIMEOUT)
        self.addCleanup(conn.close)
        conn.putrequest("POST", "/_pkgproxy/admin/purge")
        conn.putheader("Content-Length", str(10 * 1024 * 1024))
        conn.endheaders()
        self.assertEqual(conn.getresponse().status, 413)
