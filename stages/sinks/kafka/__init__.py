"""Sink `kafka`: events as JSON records, topic and key from templates, at-least-once."""

from stages.sinks.kafka.options import CreateTopics, KafkaSinkOptions
from stages.sinks.kafka.sink import KafkaSink

__all__ = ["CreateTopics", "KafkaSink", "KafkaSinkOptions"]
