"""State files under a disk that refuses writes: replaced whole or not at all, and written once it works again.

A real kernel limit (RLIMIT_FSIZE in a child process, as a full disk does) makes write() take part of
the bytes; the file being replaced must stay as it was. A `sessions` directory that is not one (removed and
a file put in its place) refuses every session record until it is a directory again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from pipeline.api import Context
from pipeline.emulator import Emulator
from stages.controller.session_store import SessionStore
from tests.test_session_api import emulator as emulator  # the shared fixture
from tests.test_session_api import running

CHILD = """
import resource, signal, sys
from pathlib import Path
from stages.controller.session_store import SessionStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: a short write, then EFBIG (as a full disk: ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
store = SessionStore(Path(sys.argv[1]))
store.save({"session_id": "cap-1", "status": "active", "metadata": {"x": "y" * 20000}})
store.flush()
"""


def test_a_record_the_disk_takes_only_part_of_leaves_the_saved_one_whole(tmp_path: Path) -> None:
    """Before: the one write() took 4,096 of ~20,000 bytes without an error, and the torn file was renamed over
    the record (a restart skipped it as not JSON: the session was no longer re-attached)."""
    store = SessionStore(tmp_path)
    store.save({"session_id": "cap-1", "status": "created", "metadata": {}})
    assert store.flush()
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert "cannot save" in out.stderr and "File too large" in out.stderr, out.stderr
    assert orjson.loads(store.path("cap-1").read_bytes())["status"] == "created"
    assert [p.name for p in store.dir.iterdir()] == ["cap-1.json"]  # no partial temporary file left either


async def test_a_session_record_the_disk_refused_is_written_once_the_disk_takes_writes_again(
        emulator: Emulator, make_context: Callable[..., Context], tmp_path: Path) -> None:
    """Before: a session made while its record could not be written got no file until its status next changed
    (for ever if it did not), so a restart did not know it: not re-attached, not in the API, its events untagged."""
    records = tmp_path / "sessions"
    async with running(make_context, emulator) as live:
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "a"}))[0] == 201
        for p in records.iterdir():
            p.unlink()
        records.rmdir()
        records.write_text("not a directory")  # every record write fails now
        status, made = await live.call("POST", "/v1/sessions", json={"end_user_id": "b"})
        assert status == 201, made  # the session goes on: its record is kept to be written later
        records.unlink()
        assert (await live.call("POST", "/v1/sessions", json={"end_user_id": "c"}))[0] == 201  # writes work again
        kept = records / f"{made['session_id']}.json"
        await live.wait_for(kept.exists)  # written after the next write that works (c's), in the writer thread
        saved = orjson.loads(kept.read_bytes())
        assert (saved["end_user_id"], saved["status"]) == ("b", "created")
    async with running(make_context, emulator) as live:
        assert made["session_id"] in live.ctl.manager.sessions
