"""Options of the session API (`controller.api`), kept apart so validating a config imports no server."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from pipeline.api import Options
from pipeline.types import Duration, Secret


class SessionApiOptions(Options):
    listen: str = Field(default="127.0.0.1:8700", description="host:port the session API listens on")
    token: Secret = Field(description="bearer token every request must carry (at least 16 characters)")
    max_body_bytes: int = Field(default=65536, ge=1024, le=16 << 20, description="larger request bodies get 413")
    max_sessions: int = Field(default=10000, ge=1, description="live sessions at most (429 beyond)")
    silent_check_interval: Duration = Field(
        default=60.0, gt=0, le=86400,
        description="this often, sessions not ended that sent no event for this long are asked about at VideoDB")
    silent_check_max: int = Field(default=50, ge=1, le=10000,
                                  description="sessions asked about per silent_check_interval at most")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        split_host_port(v)
        return v

    @field_validator("token")
    @classmethod
    def _long_enough(cls, v: Any) -> Any:
        if len(v.get_secret_value()) < 16:
            raise ValueError("use a token of at least 16 characters "
                             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return v


def split_host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:8700, got {listen!r}")
    return host, int(port)
