"""A third-party processor: upper-cases `data.text` on the channels it is given."""

from __future__ import annotations

from pipeline.api import Batch, Options, Processor
from pipeline.events import channel_set, in_channels


class ShoutOptions(Options):
    channels: list[str] = ["transcript"]
    suffix: str = "!"


class Shout(Processor):
    """Upper-case the text of matching events and add a suffix."""

    name = "shout"
    Options = ShoutOptions

    def __init__(self, options: ShoutOptions, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(options, context)
        self._channels = channel_set(options.channels)

    def process(self, batch: Batch) -> Batch:
        for event in batch:
            if in_channels(event, self._channels):
                data = event.get("data")
                if isinstance(data, dict) and isinstance(data.get("text"), str):
                    data["text"] = data["text"].upper() + self.options.suffix
        return batch
