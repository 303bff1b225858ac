"""Options of the `kafka` sink."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.api import Options, SinkOptions
from pipeline.kafka import (
    bootstrap_list,
)
from pipeline.templates import Template
from pipeline.types import ByteSize, Duration


class CreateTopics(Options):
    """Create missing topics (as they are first used) with this layout."""

    partitions: int = Field(default=1, ge=1, description="partitions per created topic")
    replication_factor: int = Field(default=1, ge=1, description="replicas per partition (1 on a single node)")


class KafkaSinkOptions(SinkOptions):
    """Options of the `kafka` sink."""

    bootstrap_servers: str | list[str] = Field(
        default="localhost:9092", description="broker addresses: host:port, comma-separated or a list")
    topic: str = Field(
        default="videodb.{channel}",
        description="topic template over event fields; lifecycle events have channel capture_session")
    key: str | None = Field(
        default="{capture_session_id}",
        description="record key template (a|b = first non-empty field); empty or null = no key")
    acks: Literal["all", 0, 1] = Field(
        default="all", description="broker acknowledgement required before write() returns")
    idempotence: bool | Literal["auto"] = Field(
        default="auto", description="idempotent producer: auto = on where the broker supports it, else off")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="none", description="record batch compression (snappy/lz4/zstd need their Python packages)")
    linger_ms: int = Field(default=5, ge=0, description="how long the producer waits to fill a batch")
    max_batch_size: int = Field(default=262144, ge=1024, description="bytes per partition batch")
    max_request_size: int = Field(
        default=1048576, ge=1024, description="largest record in bytes; bigger events are dead-lettered")
    buffer_events: int = Field(
        default=10000, ge=1, description="events held while the broker is away before write() blocks")
    buffer_bytes: ByteSize = Field(
        default=32 << 20, ge=1, description="encoded bytes held before write() blocks (the other bound)")
    request_timeout: Duration = Field(
        default=30.0, description="how long one produce attempt may take before it is retried")
    retry_backoff: Duration = Field(
        default=0.2, gt=0, description="first delay between retries; doubles up to max_retry_backoff")
    max_retry_backoff: Duration = Field(default=5.0, gt=0, description="longest delay between retries")
    shutdown_timeout: Duration = Field(
        default=10.0, description="on shutdown, how long to keep trying before dead-lettering the rest")
    max_topics: int = Field(
        default=256, ge=1, le=100_000, description="most distinct topics the template may name; events for "
        "others are dead-lettered (an event's fields must not create topics without end)")
    create_topics: CreateTopics | None = Field(
        default=None, description="create missing topics with {partitions: N}; omit for broker auto-creation")
    client_id: str = Field(default="videodb-pipeline", description="client id the broker sees")

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap(cls, v: str | list[str]) -> list[str]:
        return bootstrap_list(v)

    @field_validator("topic", "key")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            Template(v)
        return v

    @model_validator(mode="after")
    def _acks_for_idempotence(self) -> KafkaSinkOptions:
        if self.idempotence is True and self.acks != "all":
            raise ValueError("idempotence: true needs acks: all")
        return self
