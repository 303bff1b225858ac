"""Drives a videodb source and capture-session controller the way the local runtime does.

Real stages, real SDK, real emulator: `run_stages()` starts the controller
beside the source, lets the controller observe every batch, stops the source
once an exit is requested, and returns what was received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.api import Context
from pipeline.emulator import Emulator
from pipeline.session import SessionLink
from stages.controller.capture_session import CaptureSessionController
from stages.sources.videodb import VideoDBSource

API_KEY = "k-test-0123456789"

FULL_ON_ACTIVE: dict[str, Any] = {
    "transcript": True,
    "index_visuals": {"prompt": "Describe the screen", "batch_config": {"type": "time", "value": 2, "frame_count": 5},
                      "name": "screen"},
    "index_audio": {"prompt": "Summarize", "batch_config": {"type": "word", "value": 50}},
    "alerts": [{"label": "code_on_screen", "prompt": "Source code is visible", "index": "visuals"}],
}


@dataclass
class Run:
    link: SessionLink
    events: list[dict[str, Any]] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)


def settings(emu: Emulator, api_key: str = API_KEY) -> dict[str, Any]:
    return {"videodb": {"api_key": api_key, "base_url": emu.base_url, "collection_id": "default"}}


def make_stages(make_context: Callable[..., Context], emu: Emulator, *, source: dict[str, Any] | None = None,
                controller: dict[str, Any] | None = None,
                api_key: str = API_KEY) -> tuple[VideoDBSource, CaptureSessionController | None]:
    """A source and (when `controller` is given) a controller sharing one SessionLink."""
    link = SessionLink()
    sctx = make_context("source:videodb", session=link)
    sctx.settings = settings(emu, api_key)
    src = VideoDBSource(VideoDBSource.Options.model_validate({"backoff_initial": 0.02, **(source or {})}), sctx)
    ctl = None
    if controller is not None:
        cctx = make_context("controller:capture_session", session=link)
        cctx.settings = settings(emu, api_key)
        ctl = CaptureSessionController(CaptureSessionController.Options.model_validate(controller), cctx)
    return src, ctl


async def run_stages(src: VideoDBSource, ctl: CaptureSessionController | None, *,
                     timeout: float = 30.0) -> Run:
    """Run until the controller asks to exit (or the source ends); errors propagate."""
    link = src.context.session
    run = Run(link)

    async def record(conn_id: str) -> None:
        run.connections.append(conn_id)

    link.on_connection(record)

    async def ingest() -> None:
        async for batch in src.batches():
            if ctl is not None:
                ctl.observe(batch)
            run.events.extend(batch)

    async def watch_exit() -> None:
        await link.wait_exit()
        await src.stop()

    ingest_task = asyncio.create_task(ingest())
    tasks = {ingest_task, asyncio.create_task(watch_exit())}
    if ctl is not None:
        tasks.add(asyncio.create_task(ctl.start()))
    pending = set(tasks)
    try:
        async with asyncio.timeout(timeout):
            while not ingest_task.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # the first error ends the run, like the runtime's supervisor
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if ctl is not None:
            await ctl.close()
    return run


def scenario_file(tmp_path: Path, events: list[dict[str, Any]], end: float = 1.0) -> Path:
    """A small scenario in the emulator's JSONL format (default streams)."""
    path = tmp_path / "scenario.jsonl"
    lines = [{"name": "test", "end": end}, *events]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def strip_stamp(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("ts", "unix_ts")}
