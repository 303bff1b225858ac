"""A stage re-created by a reload gets the same Context a stage made at start gets. The reloader built its own
Context and left out `state_dir`: a plugin re-created by a SIGHUP kept its files under ./out, not under the
pipeline's `state_dir`, and found nothing it had saved there.

Real parts: the config loader, `build`, the local runtime and its reloader.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.api import Batch, Options, Processor

CFG = """name: ctx
state_dir: {state}
source: {{type: replay, path: none.jsonl}}
stages:
  - {{type: "tests.test_reload_context:Remembers", tag: {tag}}}
sinks: [{{type: jsonl, path: {out}/o.jsonl}}]
"""


class RemembersOptions(Options):
    tag: str = ""


class Remembers(Processor):
    """Keeps what it was given: the test compares the Context of the stage made at start with the re-created one."""

    name = "remembers"
    Options = RemembersOptions

    def process(self, batch: Batch) -> Batch:
        return batch


async def test_a_stage_re_created_by_a_reload_gets_the_pipelines_state_dir(tmp_path: Path) -> None:
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    p = tmp_path / "p.yaml"
    fields = {"state": tmp_path / "state", "out": tmp_path / "out"}
    p.write_text(CFG.format(tag="a", **fields))
    cfg = load_config(p)
    rt = LocalRuntime(build(cfg), install_signals=False)
    first = rt.b.chain.processors[0].context
    assert first.state_dir == tmp_path / "state"

    p.write_text(CFG.format(tag="b", **fields))
    assert await Reloader(rt, p, cfg).reload("test")
    again = rt.b.chain.processors[0]
    assert again.options.tag == "b"  # type: ignore[attr-defined]
    ctx = again.context
    assert (ctx.state_dir, ctx.out_dir, ctx.settings, ctx.pipeline, ctx.stage) == \
        (first.state_dir, first.out_dir, first.settings, first.pipeline, first.stage)
    assert ctx.state is first.state and ctx.dead_letter is first.dead_letter and ctx.session is first.session
    assert ctx.stats is first.stats  # the stage's counters go on for the whole run
