"""State files are replaced whole or not at all, also when the disk takes only part of a write.

A real kernel limit (RLIMIT_FSIZE in a child process, as a full disk does) makes write() take part of
the bytes; the file being replaced must stay as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from stages.controller.session_store import SessionStore

CHILD = """
import resource, signal, sys
from pathlib import Path
from stages.controller.session_store import SessionStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: a short write, then EFBIG (as a full disk: ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
SessionStore(Path(sys.argv[1])).save({"session_id": "cap-1", "status": "active", "metadata": {"x": "y" * 20000}})
"""


def test_a_record_the_disk_takes_only_part_of_leaves_the_saved_one_whole(tmp_path: Path) -> None:
    """Before: the one write() took 4,096 of ~20,000 bytes without an error, and the torn file was renamed over
    the record (a restart skipped it as not JSON: the session was no longer re-attached)."""
    store = SessionStore(tmp_path)
    store.save({"session_id": "cap-1", "status": "created", "metadata": {}})
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert "cannot save" in out.stderr and "File too large" in out.stderr, out.stderr
    assert orjson.loads(store.path("cap-1").read_bytes())["status"] == "created"
    assert [p.name for p in store.dir.iterdir()] == ["cap-1.json"]  # no partial temporary file left either
