"""Wire the operator's view onto a runtime: tap hub, HTTP server, status line, progress bar."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pipeline.build import Built
from pipeline.http.tap import Point, TapHub, points_of
from pipeline.http.view import View


def make_hub(built: Built, rt: Any, *, sinks: bool = True) -> TapHub:
    """A hub that, while clients are attached, installs itself where the runtime looks (`rt.tap`, `chain.tap`).

    `sinks=False`: no sink tap points (a faust worker taps its processors only).
    """

    def arm(hub: TapHub | None) -> None:
        rt.tap = hub
        built.chain.tap = hub if hub is not None and any(i > 0 for i in hub.clients) else None

    def points() -> list[Point]:
        return [p for p in points_of(built) if sinks or p.kind != "sink"]

    hub = TapHub(points, arm)
    rt.tap_hub = hub
    return hub


@contextlib.asynccontextmanager
async def operator_view(rt: Any, built: Built, *, role: str = "local",
                        progress: bool = False) -> AsyncIterator[View]:
    """Serve `runtime.http` (when set) and log status lines for as long as the block runs."""
    from pipeline.statusline import progress_loop, status_loop

    cfg = built.config.runtime
    view = View(built, rt, role)
    hub = make_hub(built, rt)
    server = None
    if cfg.http:
        from pipeline.http.address import parse_address
        from pipeline.http.server import OperatorServer

        host, port = parse_address(cfg.http)
        token = cfg.http_token.get_secret_value() if cfg.http_token else None
        server = OperatorServer(view, hub, host, port, token)
        await server.start()
        rt.http_server = server
    loop = asyncio.get_running_loop()
    tasks = []
    if cfg.status_interval > 0:
        tasks.append(loop.create_task(status_loop(view, cfg.status_interval), name="status-line"))
    if progress:
        tasks.append(loop.create_task(progress_loop(view), name="progress"))
    try:
        yield view
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if server is not None:
            await server.stop()


async def serve_worker(worker: Any) -> None:
    """A faust worker's operator endpoint (`pipeline worker --http`): runs until the worker stops."""
    from pipeline.http.address import parse_address
    from pipeline.http.server import OperatorServer

    built = worker.built
    cfg = built.config.runtime
    view = View(built, worker, "worker")
    hub = make_hub(built, worker, sinks=False)
    host, port = parse_address(cfg.http)
    token = cfg.http_token.get_secret_value() if cfg.http_token else None
    server = OperatorServer(view, hub, host, port, token)
    await server.start()
    worker.http_server = server
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
