"""Who may read meeting content from the operator endpoint: tokens and cookies from hostile peers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.operator_harness import config, replay_file, served

TOKEN = "s3cret-token"


async def raw(base: str, request: bytes) -> bytes:
    """What the server answers `request` (sent as these bytes) before it closes the connection."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"Cookie: videodb_pipeline_session=\xff\xfe"])
async def test_credentials_that_are_not_utf8_are_refused_not_a_traceback(
        tmp_path: Path, header: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A token or cookie holding bytes that are not UTF-8 made the comparison raise: a 500, and an ERROR with
    a 15-line traceback in the pipeline's log for every such request from anyone who reaches the port."""
    events = replay_file(tmp_path / "in.jsonl", 10)
    async with served(config(tmp_path, events, extra_runtime=f", http_token: {TOKEN}")) as (_rt, base):
        with caplog.at_level(logging.DEBUG):
            answer = await raw(base, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                               + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
