"""`state_dir`: where everything that must survive a restart lives.

One directory per pipeline (top-level `state_dir:`, default `out/<name>`):
`capture_session.json`, the videodb source's `videodb_ws_id`/`videodb_ws_pid`,
`state.db` (rule and enrich state, see `store.py`) and disk spools. Stages
reach it as `context.state_dir`; `prepare()` creates it 0700 and refuses a
symlinked path.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.files import ensure_private_dir

__all__ = ["prepare"]


def prepare(state_dir: Path) -> Path:
    """Create `state_dir` (0700, symlinks refused) and return it."""
    ensure_private_dir(state_dir)
    return state_dir
