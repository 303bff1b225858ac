"""The headless browser the page tests rely on really runs JavaScript and takes screenshots."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

from tests.browser import browser_page

PAGE = b"""<!doctype html><html><body><h1 id=t>static</h1>
<script>document.getElementById('t').textContent = 'set by script';</script></body></html>"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


def test_chromium_runs_scripts_and_screenshots(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            assert page.text_content("#t") == "set by script"
            shot = tmp_path / "shot.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 1000
    finally:
        server.shutdown()
