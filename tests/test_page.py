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


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_page_updates_by_itself_in_a_real_browser(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium); the page was not tested in a browser")
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
    # Keep the screenshot for the README (docs/operator-page.png) and as a test artefact.
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
