"""Run a config in this process, with the in-process emulator when configured.

`engine: local` runs the whole pipeline here; `engine: faust` runs the source
and controller here and publishes to the ingest topic for `pipeline worker`s.
"""

from __future__ import annotations

import dataclasses
import logging

from pydantic import SecretStr

from pipeline.build import build
from pipeline.config import PipelineConfig
from pipeline.runtime.local import LocalRuntime

log = logging.getLogger("pipeline")


async def run_local(cfg: PipelineConfig, *, install_signals: bool = True) -> LocalRuntime:
    """Build and run the pipeline; returns the finished runtime (exit code in `.exit_code`)."""
    emu = None
    if cfg.videodb.emulator is not None:
        from pipeline.emulator import Emulator

        e = cfg.videodb.emulator
        emu = Emulator(scenario=e.scenario, speed=e.speed, drop_after=e.drop_after, garbage_every=e.garbage_every)
        await emu.start("127.0.0.1", 0)
        log.info("videodb: using the local emulator at %s (speed %g)", emu.base_url, e.speed)
        videodb = cfg.videodb.model_copy(update={"base_url": emu.base_url,
                                                 "api_key": cfg.videodb.api_key or SecretStr("local-emulator-key")})
        cfg = dataclasses.replace(cfg, videodb=videodb)
    try:
        if cfg.runtime.engine == "faust":
            from pipeline.runtime.faust import ingest_runtime

            rt = ingest_runtime(cfg, install_signals=install_signals)
        else:
            from pipeline.state.store import open_store

            state = open_store(cfg.state_dir) if getattr(cfg.source.cls, "resumes", True) else None
            rt = LocalRuntime(build(cfg, state=state), install_signals=install_signals)
        rt.exit_code = await rt.run()
    finally:
        if emu is not None:
            await emu.stop()
    return rt
