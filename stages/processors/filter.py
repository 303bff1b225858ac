"""Processor `filter`: keep only the events a pipeline cares about."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.api import Batch, Context, Event, Options, Processor
from pipeline.events import ALIASES, LIFECYCLE, canonical, channel_set, in_channels
from stages.globs import glob_matcher

try:  # the plain case's loop in C (built with the package); without it the unrolled loop below does the same
    from stages.processors import _fastloops
except ImportError:  # pragma: no cover - a build without a C compiler
    _fastloops = None  # type: ignore[assignment]


def _named(event: Event, chans: frozenset[str]) -> bool:
    """A lifecycle event kept by its own name (`capture_session.active`)."""
    ev = event.get("event")
    return type(ev) is str and ev in chans  # as in_channels(), which keep() uses


class FilterOptions(Options):
    channels: list[str] | None = Field(
        default=None, min_length=1,
        description="keep these channels; visual_index = scene_index; capture_session = every "
                    "lifecycle event, capture_session.active (etc.) = just that one")
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
        # every channel name kept, aliases included: what the C loop looks an exact str channel up in
        self._kept = (frozenset(n for n in (*self._channels, *ALIASES) if canonical(n) in self._channels)
                      if self._channels is not None else None)

    #: Use the C loop when the options allow it (tests switch it off to compare both paths).
    native = True

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
        """`keep()` over the batch, unrolled with everything hoisted (the hot path)."""
        chans, names = self._channels, self._names
        final_only, min_len = self.options.final_only, self.options.min_text_length
        if chans is None and names is None and not final_only and not min_len:
            return batch
        if names is None and not min_len and _fastloops is not None and self.native:
            return _fastloops.filter(batch, self._kept, final_only, self.keep)
        lifecycle_ok = chans is not None and LIFECYCLE in chans  # all lifecycle events; else only those named
        out: Batch = []
        append = out.append
        for e in batch:
            if chans is not None:
                ch = e.get("channel")
                if ch is None:
                    if not ("event" in e and (lifecycle_ok or _named(e, chans))):
                        continue
                elif not isinstance(ch, str) or ALIASES.get(ch, ch) not in chans:
                    continue
            if names is not None and "event" not in e:
                name = e.get("rtstream_name")
                if isinstance(name, str) and not names(name):
                    continue
            if final_only or min_len:
                data = e.get("data")
                if isinstance(data, dict):
                    if final_only and data.get("is_final") is False:
                        continue
                    if min_len:
                        text = data.get("text")
                        if isinstance(text, str) and len(text.strip()) < min_len:
                            continue
            append(e)
        return out
