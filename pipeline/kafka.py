"""Kafka plumbing shared by the kafka sink, the kafka source and the faust runtime.

aiokafka is imported inside the functions so `import pipeline.cli` stays fast.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import StageError

if TYPE_CHECKING:
    from pipeline.api import Log

Idempotence = bool | Literal["auto"]

_TOPIC_BAD = re.compile(r"[^a-zA-Z0-9._-]")
#: Broker errors that retrying cannot fix: the affected events are dead-lettered.
_PERMANENT = ("MessageSizeTooLargeError", "RecordTooLargeError", "RecordListTooLargeError",
              "InvalidTopicError", "TopicAuthorizationFailedError", "CorruptRecordException",
              "PolicyViolationError")


def bootstrap_list(value: str | Iterable[str]) -> list[str]:
    """`"a:9092,b:9092"`, `kafka://a:9092;kafka://b` or a list -> `["a:9092", "b:9092"]`.

    Each address is checked here (host, port 1-65535, no other scheme), so a typo is a config error,
    not a client that retries an address it can never parse.
    """
    items = value.replace(";", ",").split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = item.strip()
        for prefix in ("kafka://", "tcp://"):
            if item.startswith(prefix):
                item = item[len(prefix):]
        item = item.rstrip("/")
        if item:
            out.append(_address(item))
    if not out:
        raise ValueError("expected host:port, e.g. localhost:9092")
    return out


def _address(item: str) -> str:
    """`host[:port]` -> `host:port` (9092 by default); a ValueError saying what is wrong otherwise."""
    if "://" in item:
        raise ValueError(f"{item!r}: expected host:port (or kafka://host:port), e.g. localhost:9092")
    host, sep, port = item.rpartition(":") if not item.endswith("]") else ("", "", "")
    if not sep:
        host, port = item, "9092"
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or (":" in host and not bracketed) or "/" in host or any(c.isspace() for c in host):
        raise ValueError(f"{item!r}: expected host:port, e.g. localhost:9092 ([::1]:9092 for IPv6)")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{item!r}: the port must be a number from 1 to 65535, e.g. localhost:9092")
    return f"{host}:{int(port)}"


def safe_topic(name: str) -> str:
    """A legal Kafka topic name: illegal characters become `_`, at most 249 characters."""
    return _TOPIC_BAD.sub("_", name)[:249]


def is_permanent(exc: BaseException) -> bool:
    """True for produce errors that no retry can fix (too large, invalid topic, not authorized)."""
    return type(exc).__name__ in _PERMANENT


def describe(exc: BaseException) -> str:
    """One short line for a Kafka client error (aiokafka messages are often empty)."""
    text = str(exc).strip()
    name = type(exc).__name__
    if not text or text == name:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


def quiet_aiokafka() -> None:
    """aiokafka logs an ERROR per reconnect attempt; our stages log outages once, clearly.

    Only applies when nobody configured the `aiokafka` logger explicitly.
    """
    lg = logging.getLogger("aiokafka")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)


class Backoff:
    """Exponential backoff between `first` and `cap` seconds, reset on success."""

    __slots__ = ("cap", "first", "next")

    def __init__(self, first: float, cap: float) -> None:
        self.first = max(first, 0.01)
        self.cap = max(cap, self.first)
        self.next = self.first

    def delay(self) -> float:
        d = self.next
        self.next = min(self.next * 2, self.cap)
        return d

    def reset(self) -> None:
        self.next = self.first


async def start_producer(idempotence: Idempotence, log: Log, who: str,
                         **kwargs: Any) -> tuple[Any, bool]:
    """Start an AIOKafkaProducer; returns (producer, idempotent).

    `auto` tries an idempotent producer and falls back once (logged) when the
    broker refuses InitProducerId; `true` makes that refusal a StageError.
    Connection errors propagate so the caller can retry with backoff.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    if idempotence is not False:
        producer = AIOKafkaProducer(enable_idempotence=True, **kwargs)
        try:
            await producer.start()
            return producer, True
        except KafkaConnectionError:
            await producer.stop()
            raise
        except Exception as exc:
            await producer.stop()
            if idempotence is True:
                raise StageError(f"{who}: the broker refused an idempotent producer ({describe(exc)}); "
                                 "set idempotence: auto or false") from None
            log.warning("%s: broker does not support idempotent producers (%s); idempotence is off, "
                        "retries may duplicate events", who, describe(exc))
        except BaseException:  # cancelled (a stop while the broker never answers): not left open behind us
            await producer.stop()
            raise
    producer = AIOKafkaProducer(enable_idempotence=False, **kwargs)
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    return producer, False


async def ensure_topics(bootstrap: list[str], names: Iterable[str], partitions: int,
                        replication_factor: int, log: Log, who: str,
                        timeout: float = 10.0) -> None:
    """Create topics that do not exist yet (existing ones are left alone).

    Raises the client's connection error when the broker is unreachable so the
    caller can retry; other refusals are logged, since auto-creation may still work.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = sorted(set(names))
    if not wanted:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout))
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return
        resp = await asyncio.wait_for(
            admin.create_topics([NewTopic(n, partitions, replication_factor) for n in missing]), timeout)
        for err in getattr(resp, "topic_errors", []):
            name, code = err[0], err[1]
            if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS (a concurrent creator won)
                log.warning("%s: could not create topic %s (error code %s)", who, name, code)
        log.info("%s: created topics %s with %d partition(s)", who, ", ".join(missing), partitions)
    finally:
        await admin.close()


async def partition_count(bootstrap: list[str], topic: str, timeout: float = 10.0) -> int | None:
    """How many partitions `topic` has (None if the broker does not know it)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        described = await asyncio.wait_for(admin.describe_topics([topic]), timeout)
    finally:
        await admin.close()
    for entry in described:
        if entry.get("topic") == topic and not entry.get("error_code") and entry.get("partitions"):
            return len(entry["partitions"])
    return None
