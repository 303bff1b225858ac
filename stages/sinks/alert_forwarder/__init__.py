"""`alert_forwarder` sink: alerts to webhooks (json, Slack, Discord, template), signed, rate-limited."""

from .options import AlertForwarderOptions
from .sink import AlertForwarder

__all__ = ["AlertForwarder", "AlertForwarderOptions"]
