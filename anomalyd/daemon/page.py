"""The operator page: the last verdict large, its image and heatmap, a filmstrip, counts and state.

Two parts. ``PageFeed`` takes each answer from the recorder without blocking
(a small queue; when the page falls behind an image is skipped, never a part)
and renders JPEGs in its own thread, off the inspection loop. ``PageServer`` is
an aiohttp application in its own thread and event loop: the page itself
(``page.html``, no build step, no CDN), ``/api/state``, a Server-Sent-Events
stream ``/api/events`` that pushes every new result, and the images.

It binds 127.0.0.1 by default; bound to any other address it needs a token
(``page.token_file`` or ``ANOMALYD_PAGE_TOKEN``), given once as ``?token=`` (then
kept in a cookie) or as ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalyd.config import is_loopback
from anomalyd.daemon.result import Result
from anomalyd.decision import Label
from anomalyd.errors import StartupError
from anomalyd.log import get_logger
from anomalyd.overlay import encode_jpeg, overlay_heatmap

log = get_logger(__name__)

TOKEN_ENV = "ANOMALYD_PAGE_TOKEN"
_FULL_MAX = 1280  # longest side of the images sent to the page
_THUMB = 160
RENDER_BACKLOG = 4  # results waiting: beyond this the page shows them without images


@dataclass
class PageItem:
    """One result as the page shows it."""

    inspection_id: int
    part_id: int
    recipe: int
    verdict: str
    score: float | None
    threshold: float
    error_code: int
    late: bool
    latency_ms: float
    time: float
    error_text: str = ""  # the error code in words (docs/plc.md)
    timeout: bool = False  # failed at the deadline (code 2): ``score`` is None, the model's is ``late_score``
    late_score: float | None = None
    images: dict[str, bytes] = field(default_factory=dict, repr=False)  # frame, overlay, thumb

    @classmethod
    def of(cls, result: Result, shown_at: float) -> PageItem:
        timeout = result.timeout
        return cls(
            inspection_id=result.inspection_id,
            part_id=result.part_id,
            recipe=result.recipe,
            verdict=str(result.label),
            score=None if timeout else result.score,  # a timeout's verdict is the deadline's, not the model's
            threshold=result.threshold,
            error_code=int(result.code),
            late=result.late,
            latency_ms=round(result.latency_ms, 2),
            time=shown_at,
            error_text=result.error_text,
            timeout=timeout,
            late_score=result.score if timeout else None,
        )

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        del out["images"]
        out["has_image"] = "overlay" in self.images
        return out


def _fit(image: np.ndarray, longest: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = longest / max(h, w)
    if scale >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


class PageFeed:
    """Answers in, rendered page items out, in a thread of its own."""

    def __init__(self, size: int, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state
        self.items: deque[PageItem] = deque(maxlen=size)
        self.skipped_images = 0
        self.skipped_items = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=256)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[PageItem], None]] = []
        self._latencies: deque[float] = deque(maxlen=500)
        self._hours: dict[int, dict[str, int]] = {}
        self._thread = threading.Thread(target=self._run, name="page-feed", daemon=True)
        self._thread.start()

    def offer(self, result: Result) -> None:
        """From the recorder, on the inspection thread: one non-blocking put, nothing else.

        The page item, the counts and the images are made on the feed's own
        thread; when the page is far behind, a result is counted as skipped
        (the PLC and the records have it regardless).
        """
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self.skipped_items += 1

    def _item(self, result: Result) -> PageItem:
        item = PageItem.of(result, time.time())
        with self._lock:
            if not result.refused:
                self._latencies.append(result.latency_ms)
            hour = self._hours.setdefault(int(item.time // 3600) * 3600, {str(label): 0 for label in Label})
            hour[item.verdict] = hour.get(item.verdict, 0) + 1
            for old in sorted(self._hours)[:-24]:
                del self._hours[old]
        return item

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while (result := self._queue.get()) is not None:
            try:
                self._feed(result)
            except Exception:  # the page is a view: a fault there is logged, never fatal to the feed
                log.exception("page.feed_error")

    def _feed(self, result: Result) -> None:
        item = self._item(result)
        if self._queue.qsize() < RENDER_BACKLOG:  # behind: this one's images are skipped, never the part
            try:
                self._render(item, result)
            except Exception as exc:  # a picture must never stop the feed
                log.warning("page.render_failed", id=item.inspection_id, error=str(exc))
        else:
            self.skipped_images += 1
        self._publish(item)

    def _render(self, item: PageItem, result: Result) -> None:
        if result.frame is None:
            return
        frame = _fit(result.frame.image, _FULL_MAX)
        if result.inspection is not None:
            fmap = result.inspection.frame_map(result.frame.image.shape)
            overlay = overlay_heatmap(frame, _fit(fmap, _FULL_MAX), item.threshold, item.score, item.verdict)
        else:
            overlay = frame
        item.images = {
            "frame": encode_jpeg(frame),
            "overlay": encode_jpeg(overlay),
            "thumb": encode_jpeg(_fit(overlay, _THUMB), quality=75),
        }

    def _publish(self, item: PageItem) -> None:
        with self._lock:
            self.items.append(item)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(item)

    def listen(self, listener: Callable[[PageItem], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def find(self, inspection_id: int) -> PageItem | None:
        with self._lock:
            return next((i for i in self.items if i.inspection_id == inspection_id), None)

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows except images."""
        with self._lock:
            lat = list(self._latencies)
            hours = [{"hour": h, **c} for h, c in sorted(self._hours.items())]
            items = [i.public() for i in self.items]
        latency = (
            {"p50": round(float(np.percentile(lat, 50)), 1), "p99": round(float(np.percentile(lat, 99)), 1)}
            if lat
            else None
        )
        return {"items": items, "per_hour": hours, "latency_ms": latency, **self.state()}

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)


def page_token(token_file: Path | None) -> str | None:
    """The token from ``token_file`` or the environment (None: no token configured)."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StartupError(f"page.token_file {token_file}: cannot read ({exc.strerror})") from None
        if len(token) < 16:
            raise StartupError(f"page.token_file {token_file}: the token must have at least 16 characters")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


class PageServer:
    """The aiohttp application, served from its own thread."""

    def __init__(
        self,
        feed: PageFeed,
        host: str,
        port: int,
        token: str | None,
        max_clients: int = 16,
        on_label: Callable[[int, str, str], None] | None = None,
    ) -> None:
        if not is_loopback(host) and token is None:
            raise StartupError(
                f"page.host {host} is not loopback: set page.token_file or {TOKEN_ENV} (the page shows "
                "production images and counts), or bind 127.0.0.1"
            )
        self.feed, self.host, self.token = feed, host, token
        self.port = port
        self.max_clients = max_clients
        self.on_label = on_label  # (inspection_id, "defect" | "good", who) → stored and audited
        self.refused_clients = 0
        self._clients: set[asyncio.Queue[bytes]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._html = resources.files("anomalyd.daemon").joinpath("page.html").read_bytes()
        self._thread = threading.Thread(target=self._run, name="page", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        if self._error is not None:
            raise StartupError(f"page.port {port} on {host}: cannot listen ({self._error})")

    # ------------------------------------------------------------ server thread
    def _run(self) -> None:
        from aiohttp import web

        loop = asyncio.new_event_loop()
        self._loop = loop

        @web.middleware
        async def auth(request: Any, handler: Any) -> Any:
            if not self._allowed(request):
                return web.Response(status=401, text="token required: open the page with ?token=…\n")
            response = await handler(request)
            if self.token is not None and request.query.get("token") and hasattr(response, "set_cookie"):
                response.set_cookie("anomalyd_token", self.token, httponly=True, samesite="Strict")
            return response

        app = web.Application(middlewares=[auth])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/label", self._label)
        app.router.add_get(r"/api/image/{id:\d+}/{kind:frame|overlay|thumb}.jpg", self._image)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=1.0)
            loop.run_until_complete(site.start())
            server: Any = site._server  # the bound socket tells the real port when 0 was asked for
            self.port = server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._runner = runner
        ticker = loop.create_task(self._ticker())

        # The feed thread hands each result over in one call; serialising happens here, once.
        def hand_over(item: PageItem) -> None:
            loop.call_soon_threadsafe(self._on_result, item)

        remove = self.feed.listen(hand_over)
        self._ready.set()
        loop.run_forever()
        remove()
        ticker.cancel()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def _allowed(self, request: Any) -> bool:
        if self.token is None:
            return True
        offered = [
            request.query.get("token", ""),
            request.cookies.get("anomalyd_token", ""),
            request.headers.get("Authorization", "").removeprefix("Bearer ").strip(),
        ]
        return any(o and hmac.compare_digest(o, self.token) for o in offered)

    async def _page(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(body=self._html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _state(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.feed.snapshot())

    async def _label(self, request: Any) -> Any:
        """A person's word on a part: ``{"inspection_id": N, "label": "defect" | "good"}`` (JSON only)."""
        from aiohttp import web

        if self.on_label is None:
            raise web.HTTPNotFound(text="labelling is not enabled\n")
        if request.content_type != "application/json":  # a plain form post from another site is refused
            raise web.HTTPUnsupportedMediaType(text="application/json only\n")
        try:
            body = await request.json()
            inspection_id, label = int(body["inspection_id"]), str(body["label"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text="expected {inspection_id, label}\n") from None
        if label not in ("defect", "good"):
            raise web.HTTPBadRequest(text="label: defect or good\n")
        who = f"operator page ({request.remote})"
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.on_label, inspection_id, label, who)
        except Exception as exc:  # no record of it, or the audit cannot be written: say so, store nothing
            raise web.HTTPConflict(text=f"{exc}\n") from None
        return web.json_response({"inspection_id": inspection_id, "label": label})

    async def _image(self, request: Any) -> Any:
        from aiohttp import web

        item = self.feed.find(int(request.match_info["id"]))
        data = item.images.get(request.match_info["kind"]) if item is not None else None
        if data is None:
            raise web.HTTPNotFound(text="no such image (only the last results are kept)\n")
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def _events(self, request: Any) -> Any:
        """Server-Sent Events: a `result` per answer, a `state` after it and every second.

        Every event is serialised once, by the broadcaster, and the same bytes
        go to every client; at most ``max_clients`` streams (the next gets 503).
        """
        from aiohttp import web

        if len(self._clients) >= self.max_clients:
            self.refused_clients += 1
            return web.Response(status=503, text=f"too many page clients (page.max_clients {self.max_clients})\n")
        inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self._clients.add(inbox)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        try:
            await response.prepare(request)
            await response.write(self._state_event(with_items=True))
            while True:
                await response.write(await inbox.get())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(inbox)
        return response

    def _state_event(self, with_items: bool = False) -> bytes:
        state = self.feed.snapshot()
        if not with_items:
            state.pop("items")
        return f"event: state\ndata: {json.dumps(state)}\n\n".encode()

    def _broadcast(self, data: bytes) -> None:
        for inbox in list(self._clients):
            if not inbox.full():  # a slow browser misses events, nobody waits for it
                inbox.put_nowait(data)

    def _on_result(self, item: PageItem) -> None:
        """On the page's loop: one result and one state, serialised once for every client."""
        if not self._clients:
            return
        self._broadcast(f"event: result\ndata: {json.dumps(item.public())}\n\n".encode() + self._state_event())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._clients:
                self._broadcast(self._state_event())

    def close(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
