"""The `alert_forwarder` sink: alert events to webhooks, signed, idempotent, retried, rate-limited.

`write` only dedupes and queues (one bounded queue per URL); delivery runs in
background tasks so a slow webhook slows ingest only once its queue is full.
Every alert is either delivered or written to the dead-letter file with the
status, attempts and reason.
"""

from __future__ import annotations

import asyncio
import ssl
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from pipeline import secrets
from pipeline.api import Batch, Context, Sink
from pipeline.errors import StageError
from pipeline.net import url_is_loopback

from .delivery import RetryPolicy, post
from .destination import Alert, Destination
from .formats import build
from .idempotency import SeenKeys, alert_key, digest_key
from .options import AlertForwarderOptions
from .ratelimit import TokenBucket
from .signing import sign_now
from .warnings import DeadLetterWarnings

if TYPE_CHECKING:
    import aiohttp

USER_AGENT = "videodb-pipeline alert_forwarder"


def _size(event: Any) -> int:
    """Encoded size of an alert, for the queue's byte bound (alerts are few: exact is cheap enough)."""
    try:
        return len(orjson.dumps(event, default=str))
    except (TypeError, orjson.JSONEncodeError):
        return 1024


class AlertForwarder(Sink):
    """Forwards alert events to one or more webhooks (json, Slack, Discord or a template)."""

    name = "alert_forwarder"
    Options = AlertForwarderOptions
    cancel_safe = True  # a cancelled write dead-letters what it had not queued; close() handles the rest

    def __init__(self, options: AlertForwarderOptions, context: Context) -> None:
        super().__init__(options, context)
        self.options: AlertForwarderOptions = options
        self.delivered = 0
        """Alerts delivered (each alert counted once per destination, digest members included)."""
        self.dead_lettered = 0
        """Alerts written to the dead-letter file (per destination)."""
        self.digests = 0
        """Digest messages delivered."""
        self.duplicates = 0
        """Alerts dropped because their idempotency key was already sent in this run."""
        self._seen = SeenKeys(options.dedupe_keys)
        self._warnings = DeadLetterWarnings(context.log)
        self._fitted: tuple[list[Alert], bytes] | None = None  # the last body _fit measured that fits, for _body
        self._secret = options.secret.get_secret_value().encode() if options.secret else None
        self._policy = RetryPolicy(options.timeout, options.max_attempts, options.max_retry_time,
                                   options.backoff_initial, options.backoff_max)
        self._session: aiohttp.ClientSession | None = None
        self._destinations: list[Destination] = []
        self._buckets: dict[str, TokenBucket] = {}  # url -> its rate-limit bucket
        self._buckets_before: dict[str, TokenBucket] = {}  # ... of the forwarder a reload replaced

    def continue_from(self, previous: Sink) -> None:
        """A reload re-created this forwarder (called before start()): each URL keeps its rate-limit bucket (a full
        new one let another burst out at every reload) and the keys already sent stay known (never twice a run)."""
        if isinstance(previous, AlertForwarder):
            self._buckets_before = previous._buckets
            if previous.options.dedupe_keys == self.options.dedupe_keys:
                self._seen = previous._seen

    async def start(self) -> None:
        import aiohttp

        tls: ssl.SSLContext | bool = True
        if self.options.ca_file:
            try:
                tls = ssl.create_default_context(cafile=str(Path(self.options.ca_file).expanduser()))
            except (OSError, ssl.SSLError) as exc:
                raise StageError(f"alert_forwarder: ca_file {self.options.ca_file}: cannot load: {exc}") \
                    from None
        limit = self.options.concurrency * len(self.options.destinations)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls, limit=limit))
        for url in self.options.destinations:
            self._destinations.append(self._destination(url))
            if urlsplit(url).scheme == "http" and not url_is_loopback(url):
                self.context.log.warning("alert_forwarder: %s uses plain http: alerts and URL tokens "
                                         "travel unencrypted", secrets.mask_url(url))
        for dest in self._destinations:
            dest.start()
        self.context.log.info("alert_forwarder: %s alerts to %s", self.options.format,
                              ", ".join(d.label for d in self._destinations))

    def _destination(self, url: str) -> Destination:
        o = self.options
        bucket = None
        if o.rate_limit:
            bucket = TokenBucket(*o.rate_limit, capacity=o.burst)
            was = self._buckets_before.get(url)
            if was is not None and (was.rate, was.capacity) == (bucket.rate, bucket.capacity):
                bucket = was
            self._buckets[url] = bucket
        return Destination(secrets.mask_url(url), partial(self._send, url), partial(self._dead_letter, url),
                           queue_size=o.queue_size, concurrency=o.concurrency, bucket=bucket,
                           digest=o.on_limit == "digest", digest_max=o.digest_max, log=self.context.log,
                           queue_bytes=o.queue_bytes, fit=self._fit)

    async def write(self, batch: Batch) -> None:
        """Dedupe by idempotency key and queue for every destination; waits only on a full queue."""
        if self._session is None:
            raise RuntimeError("alert_forwarder: write() before start()")
        alerts: list[Alert] = []
        for event in batch:
            key = alert_key(event)
            if self._seen.add(key):
                alerts.append(Alert(event, key, _size(event)))
        duplicates = len(batch) - len(alerts)
        if duplicates:
            self.duplicates += duplicates
            self.context.stats.dropped += duplicates
            self.context.log.debug("alert_forwarder: dropped %d duplicate alert(s)", duplicates)
        if alerts:
            for n, dest in enumerate(self._destinations):
                try:
                    await dest.put(alerts)
                except asyncio.CancelledError:
                    for later in self._destinations[n + 1:]:
                        later.abandon(alerts)
                    raise

    def report(self) -> dict[str, int]:
        return {"delivered": self.delivered, "dead-lettered": self.dead_lettered, "digests": self.digests,
                "duplicates": self.duplicates}

    async def flush(self) -> None:
        """Wait until everything written so far is delivered or dead-lettered (before offset commits)."""
        await asyncio.gather(*(d.flush() for d in self._destinations))

    def holding_since(self) -> float | None:
        """When the oldest alert a destination has not delivered or dead-lettered yet was queued: a `kill -9`
        loses it. So the rules' kept alerts wait for it, without a flush every second (which waited for the
        webhook, or a digest's rate limit, each time)."""
        return min((t for d in self._destinations if (t := d.holding_since()) is not None), default=None)

    async def _send(self, url: str, alerts: list[Alert]) -> None:
        """Format, sign and POST one message; count it or dead-letter its alerts."""
        assert self._session is not None
        body = self._body(url, alerts)
        if body is None:
            return
        keys = [a.key for a in alerts]
        digest = len(alerts) > 1
        key = digest_key(keys) if digest else keys[0]
        headers = {"Content-Type": "application/json", "Idempotency-Key": key, "User-Agent": USER_AGENT}
        sign = partial(sign_now, self._secret) if self._secret else None
        outcome = await post(self._session, url, body, headers, self._policy, sign=sign, log=self.context.log)
        if not outcome.ok:
            self._dead_letter(url, alerts, outcome.reason, status=outcome.status, attempts=outcome.attempts,
                              digest_key=key if digest else None)
            return
        self.delivered += len(alerts)
        if digest:
            self.digests += 1
            self.context.log.info("alert_forwarder: %s: sent a digest of %d alerts (rate limit)",
                                  secrets.mask_url(url), len(alerts))

    def _encode(self, alerts: list[Alert]) -> bytes:
        keys = [a.key for a in alerts]
        key = digest_key(keys) if len(alerts) > 1 else keys[0]
        payload = build(self.options.format, [a.event for a in alerts], keys, key,
                        template=self.options.template, digest_items=self.options.digest_items)
        return orjson.dumps(payload, default=str)

    def _fit(self, alerts: list[Alert]) -> int:
        """How many of the oldest `alerts` one digest body of at most `digest_max_bytes` carries (at least 1).

        A json digest carries each alert whole, so no more are tried than those whose own encoded sizes fit.
        Then the body is measured: all of them, else 2, 4, 8... until too many, then halving the range between
        (the work grows with what fits, not with all that waits: up to `digest_max` alerts).
        """
        bound = self.options.digest_max_bytes
        hi = len(alerts)
        if self.options.format == "json":
            total = 0
            for n, a in enumerate(alerts):
                total += a.size + len(a.key) + 4  # the event, its key in member_keys, quotes and commas
                if total > bound:
                    hi = max(1, n)
                    break
        if hi == 1 or self._measure(alerts[:hi]) <= bound:
            return hi
        lo, step = 1, 2  # lo alerts fit (or one alone, sent as it is); hi do not
        while step < hi and self._measure(alerts[:step]) <= bound:
            lo, step = step, step * 2
        hi = min(hi, step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._measure(alerts[:mid]) <= bound:
                lo = mid
            else:
                hi = mid
        return lo

    def _measure(self, alerts: list[Alert]) -> int:
        """Encoded body size; one that cannot be encoded counts as too big (_body dead-letters the culprit).
        A body that fits is kept: the last one kept is that of the alerts _fit chose, which _body then sends
        instead of encoding them again (about 8 ms for 1 MiB)."""
        try:
            body = self._encode(alerts)
        except Exception:
            return self.options.digest_max_bytes + 1
        if len(body) <= self.options.digest_max_bytes:
            self._fitted = (alerts, body)
        return len(body)

    def _measured(self, alerts: list[Alert]) -> bytes | None:
        """The body _fit measured for exactly these alerts (the same objects, in order), or None."""
        fitted, self._fitted = self._fitted, None
        if fitted is None or len(fitted[0]) != len(alerts):
            return None
        return fitted[1] if all(a is b for a, b in zip(fitted[0], alerts, strict=True)) else None

    def _body(self, url: str, alerts: list[Alert]) -> bytes | None:
        """The message body; an alert that cannot be encoded is dead-lettered alone (None: none left).

        Shrinks `alerts` in place to those the body carries.
        """
        body = self._measured(alerts)
        if body is not None:
            return body
        try:
            return self._encode(alerts)
        except Exception as exc:
            bad = []
            for a in alerts:
                try:
                    self._encode([a])
                except Exception:
                    bad.append(a)
            if not bad:  # only the combination fails (never seen): give up on the whole message
                bad = list(alerts)
            self._dead_letter(url, bad, f"cannot encode the webhook body: {type(exc).__name__}: {exc}")
            gone = {id(a) for a in bad}  # identity: comparing events could recurse as deep as they nest
            alerts[:] = [a for a in alerts if id(a) not in gone]
            return self._encode(alerts) if alerts else None

    def _dead_letter(self, url: str, alerts: list[Alert], reason: str, *, status: int | None = None,
                     attempts: int = 0, digest_key: str | None = None) -> None:
        """Write each undelivered alert to the dead-letter file with status, attempts and reason."""
        dest = secrets.mask_url(url)
        reason = secrets.mask(reason)
        extra: dict[str, Any] = {"digest_key": digest_key} if digest_key else {}
        for alert in alerts:  # (one a full dead-letter file leaves out is counted there, not here)
            self.dead_lettered += self.context.dead_letter.write(
                reason, stage=self.context.stage, origin=dest, event=alert.event, status=status, attempts=attempts,
                idempotency_key=alert.key, **extra)
        self.context.stats.errors += len(alerts)
        self._warnings.warn(dest, len(alerts), reason)

    async def close(self) -> None:
        """Deliver what is queued within `shutdown_timeout`; dead-letter the rest; close the session."""
        if self.duplicates:
            self.context.log.warning("alert_forwarder: %d alert(s) not sent again: their idempotency key was "
                                     "already sent in this run", self.duplicates)
        timeout = self.options.shutdown_timeout
        try:
            if self._destinations:
                await asyncio.wait_for(asyncio.gather(*(d.drain() for d in self._destinations)), timeout)
        except TimeoutError:
            left = sum(d.queued for d in self._destinations)
            self.context.log.warning("alert_forwarder: shutdown_timeout %gs reached with %d alert(s) "
                                     "still queued", timeout, left)
        except Exception:
            self.context.log.exception("alert_forwarder: error while draining")
        finally:
            for dest in self._destinations:
                await dest.abort(f"shutdown: not delivered within shutdown_timeout {timeout:g}s")
            self._warnings.flush()
            if self._session is not None:
                await self._session.close()
                self._session = None
