"""`type: module:Class` plugins that cannot load: whatever the module does while it is imported, and whatever the
name looks like, the config gets one line at the stage's `type:`, exit code 2, never a traceback."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from pipeline.cli import main

MODULES = {
    "boom_at_import": 'raise RuntimeError("no GPU here")\n',
    "broken_syntax": "x = (\n",
    "exits_at_import": "import sys\nsys.exit(3)\n",
    "odd_options": "from pipeline.api import Processor\n\nclass X(Processor):\n    name = 'x'\n    Options = 5\n",
}


@pytest.mark.parametrize(("type_name", "expected"), [
    ("boom_at_import:X", "importing module 'boom_at_import' raised RuntimeError: no GPU here"),
    ("broken_syntax:X", "importing module 'broken_syntax' raised SyntaxError: '(' was never closed"),
    ("exits_at_import:X", "importing module 'exits_at_import' called sys.exit(3)"),
    ("odd_options:X", "odd_options:X.Options is 5, not an options class (subclass pipeline.api.Options)"),
    (":X", "expected module:Class, such as my_plugins.mood:Mood, got ':X'"),
    ("../evil:X", "expected module:Class, such as my_plugins.mood:Mood, got '../evil:X'"),
])
def test_a_plugin_that_cannot_load_is_one_config_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      type_name: str, expected: str) -> None:
    """A module raising (or with a syntax error) while imported printed its traceback (exit 1); `sys.exit()` in
    it ended `pipeline validate` silently with the module's code; `:X` and `../evil:X` were tracebacks of
    importlib (empty module name, relative import); an `Options` that is no model crashed validation."""
    for name, body in MODULES.items():
        (tmp_path / f"{name}.py").write_text(body)
    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f'name: x\nsource: {{type: replay, path: in.jsonl}}\nstages: [{{type: "{type_name}"}}]\n'
                   "sinks: [{type: console}]\n")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipeline: {cfg}:3:11: stages[0].type: {expected}"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_stage_name_registered_twice_is_one_line_in_pipeline_stages(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Two installed packages registering the same entry-point name: `pipeline stages` printed a traceback."""
    from pipeline import registry

    monkeypatch.setattr(registry, "entry_points", lambda group: [EntryPoint("mood", "a:Mood", group),
                                                                 EntryPoint("mood", "b:Mood", group)])
    monkeypatch.setattr(registry.default_registry, "_plugins", None)
    assert main(["stages"]) == 2
    assert capsys.readouterr().err == "pipeline: stage type 'mood' is registered twice: a:Mood and b:Mood\n"


BUGGY_VALIDATOR = '''
from pydantic import field_validator

from pipeline.api import Options, Processor


class TableOptions(Options):
    table: str = "a"

    @field_validator("table")
    @classmethod
    def _known(cls, v: str) -> str:
        return {"a": "A"}[v]  # a bug: KeyError (not ValueError) for any other value


class Lookup(Processor):
    name = "lookup"
    Options = TableOptions

    def process(self, batch):
        return batch
'''


def test_a_plugin_validator_raising_keyerror_is_one_line_and_a_rejected_reload(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pydantic turns only ValueError/AssertionError into validation errors: a plugin validator raising KeyError
    made `pipeline validate` print a traceback, and a reload into such a config raised out of the reloader,
    which stopped the running pipeline (exit 1) instead of keeping it."""
    import asyncio

    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.runtime.local import LocalRuntime
    from pipeline.runtime.reload import Reloader

    (tmp_path / "lookup_plugin.py").write_text(BUGGY_VALIDATOR)
    (tmp_path / "in.jsonl").write_text("")
    cfg = tmp_path / "p.yaml"
    body = ('name: x\nsource: {{type: replay, path: in.jsonl}}\n'
            'stages: [{{type: "lookup_plugin:Lookup", table: {t}}}]\nsinks: [{{type: console}}]\n')
    cfg.write_text(body.format(t="b"))
    assert main(["validate", str(cfg)]) == 2
    assert capsys.readouterr().err == (f"pipeline: {cfg}:3:10: stages[0]: checking the options raised KeyError: 'b' "
                                       "(a bug in TableOptions)\n")
    cfg.write_text(body.format(t="a"))
    running = load_config(cfg)
    rt = LocalRuntime(build(running), install_signals=False)
    reloader = Reloader(rt, cfg, running)
    cfg.write_text(body.format(t="b"))
    assert asyncio.run(reloader.reload("SIGHUP")) is False
    assert reloader.rejected == 1  # (main() above sent the log to stderr)
    assert "reload (SIGHUP) rejected, the running config stays" in capsys.readouterr().err
