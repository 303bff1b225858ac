"""Options of the `alert_forwarder` sink: destinations, body format, signing, delivery, storm control."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline import secrets
from pipeline.api import SinkOptions
from pipeline.net import http_url
from pipeline.types import ByteSize, Duration, Rate, Secret

from .template import check_template

MIN_DIGEST_BYTES = 4096


def check_url(value: Any) -> Any:
    """Register the URL's token parts for masking first, then require an http(s) URL with a host."""
    if not isinstance(value, str):
        return value
    url = value.strip()
    if not url:
        raise ValueError("webhook URL is empty (is the environment variable set?)")
    try:
        http_url(url, "https://hooks.slack.com/services/...")
    except ValueError as exc:  # the message holds the URL: say it again with its token parts masked
        try:
            masked = secrets.mask_url(url)
        except ValueError:  # a host or port urllib cannot read: keep only the scheme
            masked = url.split("://", 1)[0] + "://***" if "://" in url else "***"
        raise ValueError(str(exc).replace(repr(url), repr(masked))) from None
    secrets.register_url(url)
    return url


class AlertForwarderOptions(SinkOptions):
    """Where and how alerts are forwarded. Only the URL is required."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    url: str | None = None
    """Webhook URL, usually `${ALERT_WEBHOOK_URL}`; path and query are masked in logs."""
    urls: list[str] = Field(default_factory=list)
    """More webhook URLs; each gets every alert, with its own queue and rate limit."""
    channels: list[str] | None = Field(default_factory=lambda: ["alert"])
    """Channels forwarded (default: alerts only)."""
    format: Literal["json", "slack", "discord", "template"] = "json"
    """Body format: json envelope, Slack or Discord incoming webhook, or `template`."""
    template: str | None = None
    """For `format: template`: e.g. `"{data[event_label]} on {rtstream_name}: {data[text]}"`."""
    secret: Secret | None = None
    """HMAC key: when set, each request carries `X-Pipeline-Signature`."""
    timeout: Duration = 10.0
    """Per-request timeout."""
    max_attempts: int = Field(5, ge=1, le=100)
    """Attempts per message before it is dead-lettered."""
    max_retry_time: Duration = 300.0
    """Give up retrying a message after this long."""
    backoff_initial: Duration = Field(default=0.5, gt=0)
    """First retry delay; doubles each attempt (with jitter) up to `backoff_max`."""
    backoff_max: Duration = Field(default=30.0, gt=0)
    """Longest retry delay (a server's `Retry-After` is honoured even when longer)."""
    rate_limit: Rate | None = None
    """Token bucket per destination, e.g. `10/min`; unset = unlimited."""
    burst: int | None = Field(None, ge=1)
    """Bucket size (messages sent at once before the rate applies); default: the rate's count."""
    on_limit: Literal["queue", "digest"] = "queue"
    """Over the rate limit: `queue` waits for tokens; `digest` folds waiting alerts into one message."""
    digest_max: int = Field(1000, ge=2, le=100_000)
    """Most alerts folded into one digest; beyond it alerts wait in the queue."""
    digest_max_bytes: ByteSize = 1 << 20
    """Encoded bytes of one digest's body at most; the alerts that do not fit wait for the next digest."""
    digest_items: int = Field(20, ge=1, le=500)
    """Alerts listed one by one in a Slack/Discord/template digest (json digests carry all)."""
    concurrency: int = Field(4, ge=1, le=64)
    """Requests in flight per destination."""
    queue_size: int = Field(1000, ge=1)
    """Alerts queued per destination before `write` waits (backpressure on ingest)."""
    queue_bytes: ByteSize = Field(16 << 20, ge=1)
    """Encoded bytes of alerts queued or in flight per destination before `write` waits."""
    shutdown_timeout: Duration = 30.0
    """On close, time allowed to deliver what is queued; the rest is dead-lettered."""
    ca_file: str | None = Field(default=None, json_schema_extra={"path": "input"})
    """Extra CA bundle (PEM) for a private HTTPS endpoint; verification always stays on."""
    dedupe_keys: int = Field(100_000, ge=1)
    """Idempotency keys remembered to drop duplicates within the run."""

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        return check_url(value)

    @field_validator("urls", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        return [check_url(v) for v in value] if isinstance(value, list) else value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if value <= 0:  # aiohttp reads a zero timeout as none at all: a hanging webhook would hold a slot forever
            raise ValueError("timeout must be more than 0 (e.g. 10s): a request must end some time")
        return value

    @field_validator("max_retry_time")
    @classmethod
    def _max_retry_time(cls, value: float) -> float:
        if value <= 0:  # 0 read as "never retry" (one try, then "next retry ... would exceed max_retry_time 0s")
            raise ValueError("max_retry_time must be more than 0 (e.g. 5m); to send each alert once, without "
                             "retries, set max_attempts: 1")
        return value

    @field_validator("shutdown_timeout")
    @classmethod
    def _shutdown_timeout(cls, value: float) -> float:
        if value <= 0:  # 0 dead-lettered at exit even an alert written just before, never sent
            raise ValueError("shutdown_timeout must be more than 0 (e.g. 30s): at 0, alerts still queued at exit "
                             "are dead-lettered without a try")
        return value

    @field_validator("digest_max_bytes")
    @classmethod
    def _digest_max_bytes(cls, value: int) -> int:
        if value < MIN_DIGEST_BYTES:  # smaller holds an alert or two: a message per alert, no longer a digest
            raise ValueError(f"digest_max_bytes must be at least 4KiB (got {value} bytes; default 1MiB, "
                             "what most webhook receivers accept)")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return check_template(value) if value is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> AlertForwarderOptions:
        if not self.destinations:
            raise ValueError("set `url` (or `urls`) to the webhook address")
        if self.format == "template" and not self.template:
            raise ValueError("format: template needs `template:`, e.g. \"{data[event_label]}: {data[text]}\"")
        if self.template and self.format != "template":
            raise ValueError(f"`template` is only used with format: template (format is {self.format})")
        return self

    @property
    def destinations(self) -> list[str]:
        """All webhook URLs, without duplicates, in config order."""
        return list(dict.fromkeys(([self.url] if self.url else []) + self.urls))
