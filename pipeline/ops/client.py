"""HTTP helpers shared by `pipeline tap` and `pipeline top`: base URL, token, one-line errors."""

from __future__ import annotations

import http.client
import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError

TOKEN_ENV = "PIPELINE_HTTP_TOKEN"
MAX_STATUS_BYTES = 16 << 20  # a status snapshot is a few kB; a server sending more is not a pipeline


class Busy(ConfigError):
    """The endpoint answered 503 or 429 (all its connections taken, asked too often): it is there, ask later."""


def base_url(url: str) -> str:
    """`127.0.0.1:9464`, `http://host:9464/` or `http://host:9464/tap` -> `http://host:9464`."""
    given = url
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here, not deep inside urllib)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"expected the pipeline's operator URL like http://127.0.0.1:9464, got {given!r}")
    return f"{parts.scheme}://{parts.netloc}"


def stop_on_ctrl_c() -> None:
    """Ctrl-C (SIGINT) stops the viewer even if it was started with SIGINT ignored (a script's background job)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def request(url: str, token: str | None) -> urllib.request.Request:
    headers = {"Accept": "text/event-stream, application/json"}
    token = token or os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, headers=headers)


def open_url(url: str, token: str | None, timeout: float | None = 10.0) -> Any:
    """Open `url`; connection failures and HTTP errors become one-line ConfigErrors."""
    try:
        return urllib.request.urlopen(request(url, token), timeout=timeout)  # base_url() allows http(s) only
    except urllib.error.HTTPError as exc:
        body = exc.read(2000).decode("utf-8", "replace").strip()
        try:
            body = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            pass
        hint = f" (set --token or {TOKEN_ENV})" if exc.code == 401 else ""
        kind = Busy if exc.code in (429, 503) else ConfigError
        raise kind(f"{url}: HTTP {exc.code}: {body or exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"{url}: cannot connect: {reason} (is the pipeline running with --http?)") from None


def read_json(resp: Any, url: str, kind: type, keys: tuple[str, ...] = ()) -> Any:
    """The JSON body of `resp` (bounded), which must be a `kind` (with `keys`, for a dict); else a ConfigError
    saying the address is not a pipeline's operator endpoint. Reading it may time out too."""
    import orjson

    try:
        body = resp.read(MAX_STATUS_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise ConfigError(f"{url}: reading the answer failed: {exc or type(exc).__name__}") from None
    try:
        value = orjson.loads(body) if len(body) <= MAX_STATUS_BYTES else None
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, kind) or (isinstance(value, dict) and not all(k in value for k in keys)):
        raise ConfigError(f"{url}: the answer is not a pipeline's status (is this the pipeline's --http "
                          "address?)")
    return value
