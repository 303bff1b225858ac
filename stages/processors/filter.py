"""Processor `filter`: keep only the events a pipeline cares about."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.api import Batch, Context, Event, Options, Processor
from pipeline.events import channel_set, in_channels
from stages.globs import glob_matcher


class FilterOptions(Options):
    channels: list[str] | None = Field(
        default=None, description="keep these channels; visual_index = scene_index; capture_session = lifecycle")
    rtstream_names: list[str] | None = Field(
        default=None, description="globs such as 'display:*'; events without an rtstream always pass")
    final_only: bool = Field(default=False, description="drop transcripts whose is_final is false")
    min_text_length: int = Field(default=0, ge=0, description="drop events whose data.text is shorter")


class Filter(Processor):
    """Drops events by channel, rtstream name, transcript finality and text length."""

    name = "filter"
    Options = FilterOptions

    def __init__(self, options: FilterOptions, context: Context) -> None:
        super().__init__(options, context)
        self._channels = channel_set(options.channels) if options.channels else None
        self._names = glob_matcher(options.rtstream_names)

    def keep(self, event: Event) -> bool:
        o = self.options
        if self._channels is not None and not in_channels(event, self._channels):
            return False
        data: Any = event.get("data")
        if self._names is not None and "event" not in event:
            name = event.get("rtstream_name")
            if isinstance(name, str) and not self._names(name):
                return False
        if isinstance(data, dict):
            if o.final_only and data.get("is_final") is False:
                return False
            if o.min_text_length:
                text = data.get("text")
                if isinstance(text, str) and len(text.strip()) < o.min_text_length:
                    return False
        return True

    def process(self, batch: Batch) -> Batch:
        return [e for e in batch if self.keep(e)]
