"""What a user types or redirects: output to a full disk or a closed stdout, config paths that are not
config files (a device, a fifo nobody writes, something huge). One line and an exit code, never a
traceback or a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("PIPELINE_DEBUG", None)


def sh(command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run `command` in sh with `pipeline` meaning this tree's CLI (redirections are the point)."""
    cli = f"{sys.executable} -m pipeline.cli"
    return subprocess.run(["sh", "-c", command.replace("pipeline ", cli + " ", 1)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_output_to_a_full_disk_is_one_line_and_exit_1() -> None:
    """`pipeline stages -v > /dev/full` printed an OSError traceback (from print, or from the final flush)."""
    res = sh("pipeline stages -v > /dev/full")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["pipeline: cannot write its output: No space left on device"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize("command", ["pipeline --help", "pipeline --version", "pipeline run --help",
                                     "pipeline emulate --help", "pipeline report --help",
                                     "python -m pipeline.listen --help"])
def test_help_and_version_to_a_full_disk_are_one_line_and_exit_1(command: str, unbuffered: str) -> None:
    """README: exit code 1 when the command's output could not be written. argparse swallowed the write error of
    `--help` and `--version`: exit 0 and not a word with PYTHONUNBUFFERED set; without it the interpreter's
    final flush failed instead (exit 120, "Exception ignored in: <_io.TextIOWrapper ...>"). A usage error on a
    full stderr keeps its exit code 2."""
    env = {**ENV, "PYTHONUNBUFFERED": unbuffered}
    cli = f"{sys.executable} -m pipeline.cli"
    command = command.replace("python", sys.executable, 1) if command.startswith("python") else \
        command.replace("pipeline", cli, 1)
    res = subprocess.run(["sh", "-c", command + " > /dev/full"], capture_output=True,
                         text=True, env=env, timeout=20, cwd=ROOT)
    assert (res.returncode, res.stderr) == (1, "pipeline: cannot write its output: No space left on device\n")
    assert sh("pipeline bogus 2> /dev/full").returncode == 2


def test_output_to_a_closed_stdout_is_one_line_not_a_traceback() -> None:
    """`pipeline schema >&-`: stdout is None in Python; the final flush raised AttributeError with a traceback.
    The schema cannot be printed, so that is an error; `validate` only reports (its exit code says it all)."""
    res = sh("pipeline schema >&-")
    assert (res.returncode, res.stderr.strip()) == (1, "pipeline: cannot write its output: stdout is closed")
    res = sh("pipeline validate config/replay.yaml >&-")
    assert (res.returncode, res.stderr) == (0, "")


def test_a_device_as_config_path_is_refused_at_once() -> None:
    """`pipeline validate /dev/zero` read forever (memory growing without end); /dev/null passed as an empty file."""
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", "/dev/zero"], capture_output=True,
                         text=True, env=ENV, timeout=15)
    assert (res.returncode, res.stderr.strip()) == (2, "pipeline: /dev/zero: is a character device, not a config file")


def test_a_piped_config_reads_its_relative_paths_from_the_current_directory(tmp_path: Path) -> None:
    """README: a pipe such as `<(envsubst < p.yaml)` works as a config. Its relative input paths resolved against
    its "directory", /dev/fd: `path: samples/in.jsonl` was "input file /dev/fd/samples/in.jsonl does not exist".
    A pipe has no directory of its own; they now resolve against the current directory."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "in.jsonl").write_text('{"channel": "transcript", "data": {"text": "hi"}}\n')
    (tmp_path / "p.yaml").write_text("name: piped\nsource: {type: replay, path: samples/in.jsonl}\n"
                                     "sinks: [{type: jsonl, path: out/piped/events.jsonl}]\n")
    cli = f"{sys.executable} -m pipeline.cli"
    res = subprocess.run(["bash", "-c", f"{cli} validate <(cat p.yaml) && {cli} run -q <(cat p.yaml)"],
                         capture_output=True, text=True, env=ENV, timeout=30, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f'{{"path": "{tmp_path}/samples/in.jsonl"}}' in res.stdout
    assert (tmp_path / "out/piped/events.jsonl").read_text().count("\n") == 1


def _config_error(path: Path) -> str:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return str(info.value)


def test_a_config_over_1_mib_is_refused_before_parsing(tmp_path: Path) -> None:
    """A 50 MB file took the YAML parser 24 s (and 180 MB) before it said anything; past 1 MiB it is not a config."""
    p = tmp_path / "big.yaml"
    p.write_text("name: x\ncomment: " + "a" * (2 << 20) + "\n")
    assert _config_error(p) == f"{p}: larger than 1 MiB: not a config file (a config is a few KB)"
    d = tmp_path / "dir.yaml"
    d.mkdir()
    assert _config_error(d) == f"{d}: is a directory, not a config file"


def test_bytes_that_are_not_text_name_their_line(tmp_path: Path) -> None:
    """Invalid UTF-8 gave Python's codec message with a byte offset; a control character gave PyYAML's two-line
    message with a character offset. Both now say line (and column), on one line."""
    p = tmp_path / "p.yaml"
    p.write_bytes(b"name: x\nsource: {type: replay, path: \xff.jsonl}\n")
    assert _config_error(p) == f"{p}:2: not UTF-8 text (byte 0xff); save the file as UTF-8"
    p.write_bytes(b"name: x\nsinks: \"a\x01b\"\n")
    msg = _config_error(p)
    assert msg.startswith(f"{p}:2:10: invalid YAML: control character 0x0001 is not allowed") and "\n" not in msg


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--port", "99999", "argument --port: expected a port 0-65535, got '99999'"),
    ("--speed", "nan", "argument --speed: speed must be >= 0 and finite (0 = no waits), got 'nan'"),
])
def test_emulate_flags_out_of_range_are_usage_errors(capsys: pytest.CaptureFixture[str], flag: str, value: str,
                                                     expected: str) -> None:
    """`pipeline emulate --port 99999` ended in bind()'s OverflowError traceback; `--speed nan` was accepted."""
    from pipeline.emulator.cli import _parser

    with pytest.raises(SystemExit) as info:
        _parser().parse_args([flag, value])
    assert info.value.code == 2 and expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        from pipeline.cli import main
        main(["emulate", flag, value])


async def test_console_honours_no_color_on_a_terminal(make_context, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """On a terminal the console sink coloured alerts even with NO_COLOR set (https://no-color.org)."""
    import io

    from stages.sinks.console import ConsoleOptions, ConsoleSink

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    alert = [{"channel": "alert", "data": {"event_label": "code", "text": "VS Code", "severity": "critical"}}]
    for no_color, expect_escape in (("", True), ("1", False)):
        monkeypatch.setenv("NO_COLOR", no_color)
        out = Tty()
        await ConsoleSink(ConsoleOptions(), make_context(), stream=out).write(alert)
        assert ("\033[" in out.getvalue()) is expect_escape, (no_color, out.getvalue())
    out = Tty()
    await ConsoleSink(ConsoleOptions(color=True), make_context(), stream=out).write(alert)
    assert "\033[" in out.getvalue()  # asked for in the config: still coloured


def test_run_refuses_an_input_that_is_no_file_before_it_starts(tmp_path: Path) -> None:
    """`pipeline validate` refused `path: /dev/zero`, but `pipeline run` started and the replay source read one
    endless line until memory ran out (MemoryError, the run never ending). `run` checks input files as validate
    does. (The child gets a 1 GB address-space limit, so the old behaviour cannot take the machine's memory.)"""
    import resource

    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: z\nsource: {type: replay, path: /dev/zero}\nsinks: [{type: console}]\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    try:
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "-q", str(cfg)], capture_output=True,
                             text=True, env=ENV, timeout=20, cwd=tmp_path, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        raise AssertionError("pipeline run kept reading /dev/zero") from None
    assert (res.returncode, res.stderr) == (2, f"pipeline: {cfg}:2:24: source.path: input file /dev/zero is not a "
                                               "file (a character device)\n")


def test_a_worker_with_a_bad_http_address_is_refused_before_it_waits_for_the_broker(tmp_path: Path) -> None:
    """`pipeline worker CONFIG --http x:y` retried its broker for ever (when down) before looking at --http;
    `pipeline run` refuses the same address at once. Now the worker does too: one line, exit 2."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: w\nsource: {type: replay, path: in.jsonl}\nsinks: [{type: console}]\n"
                   "runtime: {engine: faust, broker: 'kafka://127.0.0.1:1'}\n")
    (tmp_path / "in.jsonl").write_text("")
    try:
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "worker", str(cfg), "--http", "x:y"],
                             capture_output=True, text=True, env=ENV, timeout=10, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker waited for its broker before checking --http") from None
    assert (res.returncode, res.stderr) == (
        2, "pipeline: --http: expected HOST:PORT like 127.0.0.1:9464 (port 0-65535), got 'x:y'\n")
