"""Rules match a keyword whatever Unicode normalization form the text or the keyword is in.

"café" is one character "é" (NFC) or "e" + U+0301 (NFD, as macOS and some OCR engines write it). A rule
keyed "café" never fired on an NFD transcript (and an NFD keyword never on an NFC text); worse, the
word "cafe" matched the NFD "café" (the combining mark is not a word character). Now keywords and
texts are compared in NFC; an alert still carries the event's text as it came and the keywords as written.

Real parts: the `pipeline test` CLI in a subprocess on real files, and the stage on both its paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from stages.processors.rules import Rules, RulesOptions
from tests.procs import ROOT

NFC_CAFE, NFD_CAFE = "caf\u00e9", "cafe\u0301"

CONFIG = r"""name: nfc
source: {type: replay, path: ev.jsonl}
stages:
  - type: rules
    rules:
      - {name: nfc-word, keywords: ["caf\u00e9"]}
      - {name: nfd-phrase, keywords: ["cre\u0300me bru\u0302le\u0301e"]}
      - {name: plain-cafe, keywords: [cafe]}
  - type: rules
    rules:
      - {name: nfc-sub, match: substring, keywords: ["na\u00efve"]}
      - {name: nfd-regex, match: regex, keywords: ["re\u0301sume\u0301\\s+\\d+"]}
sinks: [{type: console}]
"""

TESTS = r"""config: p.yaml
cases:
  - name: nfd text, nfc word keyword (C engine)
    stages: ["stages[0]"]
    input: [{channel: transcript, data: {text: "a cafe\u0301 au lait"}}]
    expect: {alerts: [{label: nfc-word, matched: ["caf\u00e9"], count: 1}], only_these_alerts: true}
  - name: nfc text, nfd phrase keyword (C engine)
    stages: ["stages[0]"]
    input: [{channel: transcript, data: {text: "une CR\u00c8ME br\u00fbl\u00e9e"}}]
    expect: {alerts: [{label: nfd-phrase, matched: ["cre\u0300me bru\u0302le\u0301e"], count: 1}],
             only_these_alerts: true}
  - name: nfd text, nfc substring keyword (Python path)
    stages: ["stages[1]"]
    input: [{channel: visual_index, data: {text: "NAI\u0308VETY"}}]
    expect: {alerts: [{label: nfc-sub, matched: ["na\u00efve"], count: 1}], only_these_alerts: true}
  - name: nfc text, nfd regex keyword (Python path)
    stages: ["stages[1]"]
    input: [{channel: visual_index, data: {text: "R\u00c9SUM\u00c9  42"}}]
    expect: {alerts: [{label: nfd-regex, count: 1}], only_these_alerts: true}
"""


def test_pipeline_test_matches_across_normalization_forms(tmp_path: Path) -> None:
    (tmp_path / "ev.jsonl").write_text('{"channel": "transcript", "data": {"text": "hi"}}\n')
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "p.test.yaml").write_text(TESTS)
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "test", "p.test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 passed, 0 failed, 0 errors" in res.stdout, res.stdout


def _stage(make_context: Any, native: bool, spec: list[dict[str, Any]]) -> Rules:
    saved = Rules.native
    Rules.native = native
    try:
        stage = Rules(RulesOptions.model_validate({"rules": spec}), make_context())
    finally:
        Rules.native = saved
    assert (stage._engine is not None) == native
    return stage


def _alerts(stage: Rules, text: str) -> list[tuple[str, Any, str]]:
    out = stage.process([{"channel": "transcript", "data": {"text": text, "start": 1}}])
    return [(e["data"]["event_label"], e["data"]["matched"], e["data"]["text"]) for e in out
            if e.get("origin") == "rules"]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize(("keyword", "text"), [(NFC_CAFE, f"un {NFD_CAFE}."), (NFD_CAFE, f"un {NFC_CAFE.upper()}."),
                                               (f"{NFC_CAFE} noir", f"{NFD_CAFE}\tNOIR")])
def test_word_rules_match_across_forms_on_both_paths(make_context, native: bool, keyword: str,  # type: ignore[no-untyped-def]
                                                     text: str) -> None:
    stage = _stage(make_context, native, [{"name": "a", "keywords": [keyword]}, {"name": "b", "keywords": ["cafe"]}])
    assert unicodedata.normalize("NFC", keyword) != keyword or unicodedata.normalize("NFC", text) != text
    # the text as it came, the keyword as written; "cafe" is not the word "café" in either form
    assert _alerts(stage, text) == [("a", [keyword], text)]


@pytest.mark.parametrize(("spec", "text", "matched"), [
    ({"match": "substring", "keywords": [NFC_CAFE]}, f"x{NFD_CAFE.upper()}x", [NFC_CAFE]),
    ({"match": "substring", "keywords": [NFD_CAFE]}, f"x{NFC_CAFE}x", [NFD_CAFE]),
    ({"match": "regex", "keywords": [rf"{NFC_CAFE}\s+\d+"]}, f"{NFD_CAFE}  42", [f"{NFC_CAFE}  42"]),
    ({"match": "regex", "keywords": [rf"{NFD_CAFE}\s+\d+"]}, f"{NFC_CAFE} 7", [f"{NFC_CAFE} 7"]),
])
def test_substring_and_regex_rules_match_across_forms(make_context, spec: dict[str, Any], text: str,  # type: ignore[no-untyped-def]
                                                      matched: list[str]) -> None:
    stage = _stage(make_context, False, [{"name": "a", **spec}])
    assert _alerts(stage, text) == [("a", matched, text)]


EXPECT_TESTS = r"""config: p.yaml
cases:
  - name: an expectation's keyword in NFD, the rule's in NFC
    stages: ["stages[0]"]
    input: [{channel: transcript, rtstream_id: rts-1, data: {text: "un caf\u00e9"}}]
    expect: {alerts: [{label: nfc-word, matched: ["CAFE\u0301"], count: 1}]}
  - name: a count-0 expectation's keyword in NFD, the rule's in NFC
    stages: ["stages[0]"]
    input: [{channel: transcript, rtstream_id: rts-1, data: {text: "tea"}}]
    expect: {alerts: [{label: nfc-word, matched: ["cafe\u0301"], count: 0}]}
"""


def test_pipeline_test_expectations_name_keywords_in_either_form(tmp_path: Path) -> None:
    """`expect.alerts[].matched` is compared with data.matched (the keywords as written) in NFC too: an NFD
    spelling failed the case, and in a `count: 0` expectation was refused as a keyword no rule has."""
    (tmp_path / "ev.jsonl").write_text('{"channel": "transcript", "data": {"text": "hi"}}\n')
    (tmp_path / "p.yaml").write_text(CONFIG)
    (tmp_path / "p.test.yaml").write_text(EXPECT_TESTS)
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "test", "p.test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed, 0 failed, 0 errors" in res.stdout, res.stdout
