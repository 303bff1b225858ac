"""Run a config in this process, with the in-process emulator when configured.

`engine: local` runs the whole pipeline here; `engine: faust` runs the source
and controller here and publishes to the ingest topic for `pipeline worker`s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from pydantic import SecretStr

from pipeline.build import build
from pipeline.config import PipelineConfig
from pipeline.http.attach import operator_view
from pipeline.runtime.local import LocalRuntime
from pipeline.runtime.reload import Reloader

log = logging.getLogger("pipeline")


async def run_local(cfg: PipelineConfig, *, install_signals: bool = True, watch: bool = False,
                    progress: bool = False) -> LocalRuntime:
    """Build and run the pipeline; returns the finished runtime (exit code in `.exit_code`).

    SIGHUP (and, with `watch`, a change of `cfg.file`) reloads the config while it runs.
    `progress`: show a progress bar for a replay source (the caller checks for a terminal).
    """
    original = cfg
    emu = None
    if cfg.videodb.emulator is not None:
        from pipeline.emulator import Emulator

        e = cfg.videodb.emulator
        emu = Emulator(scenario=e.scenario, speed=e.speed, drop_after=e.drop_after, garbage_every=e.garbage_every,
                       queue_on_drop=e.queue_on_drop)
        await emu.start("127.0.0.1", 0)
        log.info("videodb: using the local emulator at %s (speed %g)", emu.base_url, e.speed)
        videodb = cfg.videodb.model_copy(update={"base_url": emu.base_url,
                                                 "api_key": cfg.videodb.api_key or SecretStr("local-emulator-key")})
        cfg = dataclasses.replace(cfg, videodb=videodb)
    from pipeline.state import guard, prepare, release

    resumes = getattr(cfg.source.cls, "resumes", True)  # replay: every run starts afresh, nothing to lock
    locked: asyncio.Task[None] | None = None
    try:
        if resumes:
            prepare(cfg.state_dir)
            locked = asyncio.create_task(guard(cfg.state_dir))  # the lock is made again if state_dir is removed
        if cfg.runtime.engine == "faust":
            from pipeline.runtime.faust_ingest import ingest_runtime

            rt = ingest_runtime(cfg, install_signals=install_signals)
            if watch:
                log.warning("--watch: reloading needs engine: local; the ingest process runs no processors")
        else:
            from pipeline.state.store import open_store

            rt = LocalRuntime(build(cfg, state=open_store(cfg.state_dir) if resumes else None),
                              install_signals=install_signals)
            rt.reloader = Reloader(rt, cfg.file, original, watch=watch)
        role = "ingest" if cfg.runtime.engine == "faust" else "local"
        async with operator_view(rt, rt.b, role=role, progress=progress and cfg.source.type_name == "replay"):
            rt.exit_code = await rt.run()
    finally:
        if locked is not None:
            locked.cancel()
        release(cfg.state_dir)
        if emu is not None:
            await emu.stop()
    return rt
