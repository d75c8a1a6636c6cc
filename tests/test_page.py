"""The operator page in a real browser (headless Chromium) against the running daemon."""

from __future__ import annotations

import asyncio
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cdp import Browser, find_chromium
from tests.conftest import free_port
from tests.harness import stop, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def chromium() -> str:
    """Debian's headless Chromium, or a skip that says the page was not tested in a browser."""
    found = find_chromium()
    if found is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium); the page was not tested in a browser")
    return found


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.e2e
def test_the_page_updates_by_itself_in_a_real_browser(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path, chromium: str
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    url = f"http://127.0.0.1:{r.page_port}/"
    for part in (1, 2, 3):
        assert r.plc.inspect_once(10.0, part_id=part) is not None
    browser = Browser(chromium, free_port(), tmp_path / "profile")
    try:

        async def steps(page: Any) -> tuple[str, int, str, int]:
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            await page.wait_for("document.querySelectorAll('#strip .thumb').length === 3")
            await page.wait_for("document.getElementById('part').textContent === '3'")
            first = await page.evaluate("document.getElementById('verdict').textContent")
            # Two more parts while the page is open: it must follow without a reload.
            loop = asyncio.get_running_loop()
            for part in (4, 5):
                res = await loop.run_in_executor(None, lambda p=part: r.plc.inspect_once(10.0, part_id=p))
                assert res is not None
            await page.wait_for("document.querySelectorAll('#strip .thumb').length === 5")
            await page.wait_for("document.getElementById('part').textContent === '5'")
            await page.wait_for("document.querySelector('#view img') && document.querySelector('#view img').complete")
            await page.wait_for("document.querySelector('#strip .thumb img').naturalWidth > 0")
            verdict = await page.evaluate("document.getElementById('verdict').textContent")
            await page.wait_for("document.getElementById('audit').textContent.includes('start')")  # the audit log
            # The counts follow too: five answers since start.
            await page.wait_for(
                "[...document.querySelectorAll('#counts tbody tr')[0].children].slice(1)"
                ".reduce((a, td) => a + Number(td.textContent), 0) === 5"
            )
            shot = tmp_path / "page.png"
            await page.screenshot(shot)
            # Open one result from the filmstrip: full image and heatmap side by side.
            await page.evaluate("document.querySelector('#strip .thumb').click()")
            await page.wait_for("document.getElementById('modal').className === 'open'")
            await page.wait_for("document.getElementById('moverlay').naturalWidth > 0")
            width = await page.evaluate("document.getElementById('moverlay').naturalWidth")
            return first, 5, verdict, width

        first, _count, verdict, width = browser.run(steps)
    finally:
        browser.close()
    assert first in ("OK", "NG", "WARN") and verdict in ("OK", "NG", "WARN") and width > 0
    status = r.plc.read_status()
    assert verdict == ("OK" if status.passed else "NG") or verdict == "WARN"
    # Keep the screenshot for docs/technician.md (docs/operator-page.png) and as a test artefact.
    shot = tmp_path / "page.png"
    assert shot.stat().st_size > 10_000
    (ROOT / "var").mkdir(exist_ok=True)
    shutil.copy(shot, ROOT / "var" / "operator-page.png")
    assert stop(r) == 0


def test_the_page_beyond_loopback_needs_a_token(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    token = tmp_path / "page.token"
    token.write_text("a-long-enough-page-token-1234\n")
    r = daemon_factory(e2e_bundle, sample_dir, page__token_file=str(token))
    base = f"http://127.0.0.1:{r.page_port}"
    assert _get(base + "/api/state")[0] == 401
    assert _get(base + "/api/state?token=wrong-token-of-some-length")[0] == 401
    status, body = _get(base + "/api/state?token=a-long-enough-page-token-1234")
    assert status == 200 and b'"counts"' in body
    assert stop(r) == 0


def _sse(port: int) -> Any:
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    return s


def _read_until(s: Any, marker: bytes, timeout: float = 10.0) -> bytes:
    import time

    s.settimeout(0.5)
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def test_page_streams_are_capped_and_every_client_gets_the_same_result(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    import json

    r = daemon_factory(e2e_bundle, sample_dir, page__max_clients=3)
    streams = [_sse(r.page_port) for _ in range(3)]
    try:
        for s in streams:
            assert _read_until(s, b"event: state").startswith(b"HTTP/1.1 200")
        extra = _sse(r.page_port)
        assert _read_until(extra, b"\r\n\r\n").startswith(b"HTTP/1.1 503")  # the fourth is refused
        extra.close()
        res = r.plc.inspect_once(10.0, part_id=4242)
        assert res is not None and res.attributed
        marker = f'"inspection_id": {res.status.inspection_id},'.encode()
        seen = []
        for s in streams:
            data = _read_until(s, marker)
            line = next(x for x in data.split(b"\n") if x.startswith(b"data: ") and marker in x)
            seen.append(json.loads(line[6:]))
        assert all(item == seen[0] for item in seen) and seen[0]["part_id"] == 4242
        streams.pop().close()  # one leaves: a new client is served again (once the server has seen it go)

        def served() -> bool:
            s = _sse(r.page_port)
            if _read_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 200"):
                streams.append(s)
                return True
            s.close()
            return False

        wait_until(served, what="a new stream served after one left")
    finally:
        for s in streams:
            s.close()
    assert stop(r) == 0


_LAYOUT = """(() => {
  const r = (el) => { const b = el.getBoundingClientRect(); return {x: b.left, y: b.top, w: b.width, h: b.height}; };
  const view = document.getElementById('view'), im = view.querySelector('img');
  const cs = getComputedStyle(view), border = parseFloat(cs.borderLeftWidth);
  const inner = {w: view.clientWidth, h: view.clientHeight};
  const k = Math.min(inner.w / im.naturalWidth, inner.h / im.naturalHeight);  // object-fit: contain
  return {overflow: document.documentElement.scrollWidth - window.innerWidth, vw: window.innerWidth,
          vh: window.innerHeight, view: r(view), inner, border, natural: [im.naturalWidth, im.naturalHeight],
          drawn: [im.naturalWidth * k, im.naturalHeight * k], scale: k, rendering: getComputedStyle(im).imageRendering,
          verdict: r(document.getElementById('verdict')),
          verdictFont: parseFloat(getComputedStyle(document.getElementById('verdict')).fontSize),
          age: document.getElementById('age').textContent, error: document.getElementById('error').textContent};
})()"""


@pytest.mark.e2e
def test_the_page_is_a_line_screen_from_a_phone_to_a_1920_panel(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path, chromium: str
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, page__stale_after_s=3)
    url = f"http://127.0.0.1:{r.page_port}/"
    assert r.plc.inspect_once(10.0, part_id=1) is not None
    r.plc.set_command(enable=False)  # the last answer: refused, its error in words
    assert r.plc.wait_for(lambda s: not s.trigger_ready, 2.0)
    assert r.plc.inspect_once(5.0, part_id=2, interlock=False) is not None
    r.plc.set_command(enable=True)
    assert r.plc.inspect_once(10.0, part_id=3) is not None  # the shown one: with an image
    browser = Browser(chromium, free_port(), tmp_path / "profile")
    layouts: dict[tuple[int, int], dict[str, Any]] = {}
    try:

        async def steps(page: Any) -> dict[str, Any]:
            await page.call("Page.enable")
            for width, height in ((1920, 1080), (1280, 800), (390, 844)):
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width, height=height, deviceScaleFactor=1, mobile=width < 600,
                )  # fmt: skip
                await page.call("Page.navigate", url=url)
                await page.wait_for(
                    "document.getElementById('part') && document.getElementById('part').textContent === '3'"
                )
                await page.wait_for(
                    "document.querySelector('#view img') && document.querySelector('#view img').naturalWidth > 0"
                )
                layouts[(width, height)] = await page.evaluate(_LAYOUT)
                await page.screenshot(tmp_path / f"page-{width}x{height}.png")
            # The error of a refused part in words, from the filmstrip's item (the page's own rendering).
            words = await page.evaluate(
                "(() => { const it = [...items.values()].find(i => i.part_id === 2);"
                " showResult(it); return document.getElementById('error').textContent; })()"
            )
            timeout = await page.evaluate(
                "(() => { showResult({inspection_id: 99, part_id: 77, recipe: 0, verdict: 'NG', score: null,"
                " late_score: 0.4, threshold: 1, error_code: 2, error_text: 'no result within daemon.budget_ms',"
                " late: true, timeout: true, latency_ms: 130, time: now(), has_image: false});"
                " return [document.getElementById('score').textContent,"
                " document.getElementById('inspection').textContent]; })()"
            )
            # The PLC goes away: the banner says so and the last verdict is greyed out as stale.
            await asyncio.get_running_loop().run_in_executor(None, r.plc.stop)
            await page.wait_for("document.getElementById('banner').textContent.includes('PLC DOWN')", 20.0)
            banner = await page.evaluate(
                "[getComputedStyle(document.getElementById('banner')).display,"
                " document.getElementById('verdict').className,"
                " document.getElementById('banner').getBoundingClientRect().height]"
            )
            await page.screenshot(tmp_path / "page-plc-down.png")
            return {"words": words, "timeout": timeout, "banner": banner}

        seen = browser.run(steps)
    finally:
        browser.close()
    for (width, height), m in layouts.items():
        where = f"{width}x{height}: {m}"
        assert m["overflow"] <= 0, f"wider than the screen at {where}"
        # The image fills its panel (one side touches it) and is scaled up with crisp pixels.
        assert max(m["drawn"][0] / m["inner"]["w"], m["drawn"][1] / m["inner"]["h"]) > 0.99, where
        assert m["scale"] > 1.0 and m["rendering"] == "pixelated", where
        assert m["verdict"]["h"] >= 60 and m["verdictFont"] >= 56, where
        assert m["verdict"]["x"] >= 0 and m["verdict"]["x"] + m["verdict"]["w"] <= width, where
        assert m["verdict"]["y"] + m["verdict"]["h"] <= height, f"the verdict needs scrolling at {where}"
        assert "part 3" in m["age"] and "ago" in m["age"], where
    big, panel, phone = layouts[(1920, 1080)], layouts[(1280, 800)], layouts[(390, 844)]
    assert big["drawn"][1] > 600 and panel["drawn"][1] > 450, "most of the screen's height is the part"
    assert phone["drawn"][0] >= 340 and phone["view"]["w"] >= 370, "on a phone the image spans the width"
    assert big["verdictFont"] > panel["verdictFont"], "a bigger panel, a bigger verdict"
    assert (
        seen["words"]
        == "trigger (or hardware-triggered frame) while enable = 0: answered at once, not inspected (code 7)"
    )
    assert seen["timeout"] == ["timeout", "99 (timeout)"]
    display, verdict_class, height = seen["banner"]
    assert display == "block" and verdict_class == "stale" and height > 20
    (ROOT / "var").mkdir(exist_ok=True)
    for shot in tmp_path.glob("page-*.png"):
        shutil.copy(shot, ROOT / "var" / shot.name)


def test_a_timeout_part_shows_the_deadlines_verdict_not_the_models_late_score() -> None:
    import numpy as np

    from anomalyd.daemon.handshake import Answer, ErrorCode
    from anomalyd.daemon.page import PageFeed
    from anomalyd.daemon.result import Result
    from anomalyd.drivers.plc.layout import Status
    from anomalyd.model.inspector import Inspection

    feed = PageFeed(4, lambda: {})
    try:
        late = Inspection(0.42, 0.42, np.zeros((4, 4), np.float32), None, {})
        status = Status(inspection_id=7, part_id=70, fail=True, error=True, error_code=int(ErrorCode.OVER_BUDGET))
        feed.offer(Result(Answer(status, late=True), 130.0, inspection=late))
        ok = Status(inspection_id=8, part_id=71, passed=True, threshold=1.0)
        feed.offer(Result(Answer(ok), 20.0, inspection=Inspection(0.3, 0.3, np.zeros((4, 4), np.float32), None, {})))
        wait_until(lambda: feed.find(8) is not None, what="both items")
        timeout, normal = feed.find(7).public(), feed.find(8).public()  # type: ignore[union-attr]
    finally:
        feed.close()
    assert timeout["timeout"] and timeout["score"] is None and timeout["late_score"] == 0.42
    assert timeout["verdict"] == "NG" and timeout["error_text"].startswith("no result within daemon.budget_ms")
    assert not normal["timeout"] and normal["score"] == 0.3 and normal["error_text"] == ""
