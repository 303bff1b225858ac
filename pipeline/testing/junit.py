"""JUnit XML for CI systems: one testsuite per test file, one testcase per case."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.errors import ConfigError, StageError
from pipeline.files import write_private_text
from pipeline.stale import remove_stale
from pipeline.testing.run import Result

#: what XML 1.0 cannot hold, even escaped (control characters are `\xNN` already, see command.py): a case named
#: "\uFFFE" (a YAML escape) or an event text with U+FFFF made a report no CI system could parse
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def write_junit(path: Path, results: list[Result]) -> None:
    root = ET.Element("testsuites", name="pipeline test", tests=str(len(results)),
                      failures=str(sum(not r.ok and not r.error for r in results)),
                      errors=str(sum(r.error for r in results)))
    by_file: dict[str, list[Result]] = {}
    for r in results:
        by_file.setdefault(r.file, []).append(r)
    for file, rs in by_file.items():
        suite = ET.SubElement(root, "testsuite", name=_xml(file), tests=str(len(rs)),
                              failures=str(sum(not r.ok and not r.error for r in rs)),
                              errors=str(sum(r.error for r in rs)), time=f"{sum(r.seconds for r in rs):.3f}")
        for r in rs:
            case = ET.SubElement(suite, "testcase", classname=_xml(file), name=_xml(r.name), time=f"{r.seconds:.3f}")
            if not r.ok:
                fail = ET.SubElement(case, "error" if r.error else "failure",
                                     message=_xml(r.failures[0].splitlines()[0]))
                fail.text = _xml("\n".join(r.failures))
    remove_stale(path.parent, names={path.name})  # left by a run killed as it wrote this file
    try:  # 0600 in 0700 directories, as every file the pipeline writes (it holds the cases' event text)
        write_private_text(path, ET.tostring(root, encoding="unicode", xml_declaration=True))
    except StageError as exc:
        raise ConfigError(f"--junit: {exc}") from None
