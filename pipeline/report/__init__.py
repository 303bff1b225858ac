"""`pipeline report`: one self-contained HTML page per capture session from the pipeline's JSONL output."""

from __future__ import annotations

from pipeline.report.build import build_reports

__all__ = ["build_reports"]
