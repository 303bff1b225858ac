"""Prometheus exposition: one custom collector that reads the pipeline's own counters at scrape time.

Each pipeline gets its own CollectorRegistry (several pipelines may share a process, as
in tests). Counters are the exit summary's counters, so the two always agree; nothing
is added on the per-event path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from pipeline.http.view import View, source_connected
from pipeline.stats import Histogram

P = "videodb_pipeline_"
SESSION_STATES = ("created", "starting", "active", "stopping", "stopped", "exported", "failed")


def _hist(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(P + name, doc, labels=labels)


def _add_hist(family: HistogramMetricFamily, values: list[str], h: Histogram) -> None:
    family.add_metric(values, h.cumulative(), h.sum)


class PipelineCollector:
    """Yields every `videodb_pipeline_*` family from a View."""

    def __init__(self, view: View) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # no describe at registration time (the counters may not exist yet)

    def collect(self) -> Iterator[Metric]:
        v = self.view
        b = v.built
        name = v.name
        base = ["pipeline"]

        info = GaugeMetricFamily(P + "info", "Pipeline identity (value 1)", labels=[*base, "role"])
        info.add_metric([name, v.role], 1)
        yield info
        up = GaugeMetricFamily(P + "uptime_seconds", "Seconds since the pipeline started", labels=base)
        up.add_metric([name], time.monotonic() - v.started)
        yield up
        ready = GaugeMetricFamily(P + "ready", "1 when /ready answers 200", labels=base)
        ready.add_metric([name], 0 if v.ready() else 1)
        yield ready
        loop = GaugeMetricFamily(P + "loop_lag_seconds", "How late the event loop ran its last heartbeat",
                                 labels=base)
        loop.add_metric([name], v.loop_lag)
        yield loop

        labels = [*base, "stage", "kind"]
        ins = CounterMetricFamily(P + "stage_events_in", "Events a stage received", labels=labels)
        outs = CounterMetricFamily(P + "stage_events_out", "Events a stage passed on (alerts included)",
                                   labels=labels)
        drops = CounterMetricFamily(P + "stage_events_dropped",
                                    "Events a stage did not pass on (filtered, or rejected by the source)",
                                    labels=labels)
        errs = CounterMetricFamily(P + "stage_errors", "Events a stage failed on (dead-lettered)", labels=labels)
        for st in b.stats:
            if st.kind not in ("source", "processor"):
                continue
            lv = [name, st.name, st.kind]
            ins.add_metric(lv, st.received)
            outs.add_metric(lv, st.sent)
            drops.add_metric(lv, st.dropped if st.kind == "source" else max(0, st.received - st.sent))
            errs.add_metric(lv, st.errors)
        yield from (ins, outs, drops, errs)

        labels = [*base, "sink"]
        s_in = CounterMetricFamily(P + "sink_events_in", "Events offered to a sink before routing", labels=labels)
        s_w = CounterMetricFamily(P + "sink_events_written", "Events a sink wrote", labels=labels)
        s_e = CounterMetricFamily(P + "sink_errors", "Events a sink failed to write (dead-lettered)",
                                  labels=labels)
        s_q = GaugeMetricFamily(P + "sink_queue_events", "Events waiting for a sink (in memory or spooled)",
                                labels=labels)
        s_qc = GaugeMetricFamily(P + "sink_queue_capacity_batches", "Batches a sink's buffer holds before "
                                 "backpressure", labels=labels)
        s_sp = GaugeMetricFamily(P + "sink_spool_bytes", "Bytes a sink has spilled to disk", labels=labels)
        s_out = CounterMetricFamily(P + "sink_outcomes", "Per-sink outcome counters (delivered, dead-lettered...)",
                                    labels=[*labels, "outcome"])
        lat = _hist("sink_latency_seconds", "Receipt by the source to written by the sink", labels)
        for i, slot in enumerate(b.sinks):
            lv = [name, slot.stats.name]
            s_in.add_metric(lv, slot.stats.received)
            s_w.add_metric(lv, v.written(i))
            s_e.add_metric(lv, slot.stats.errors)
            s_q.add_metric(lv, v.queue_depth(i))
            s_qc.add_metric(lv, v.queue_capacity(i))
            spool = v.spool_bytes(i)
            s_sp.add_metric(lv, spool or 0)
            for key, n in slot.report().items():
                if key != "written":
                    s_out.add_metric([*lv, key.replace("-", "_")], n)
            h = v.latency(i)
            if h is not None:
                _add_hist(lat, lv, h)
        yield from (s_in, s_w, s_e, s_q, s_qc, s_sp, s_out, lat)

        lag = _hist("event_lag_seconds", "Now minus event time of the newest event of each batch, at ingest",
                    base)
        if v.lag is not None:
            _add_hist(lag, [name], v.lag)
        yield lag

        dead = CounterMetricFamily(P + "dead_letters", "Events written to the dead-letter file, by reason",
                                   labels=[*base, "reason"])
        for reason, n in sorted(b.dead_letter.by_reason.items()):
            dead.add_metric([name, reason], n)
        yield dead
        full = CounterMetricFamily(P + "dead_letters_unwritten", "Rejects not written: the dead-letter file had "
                                   "reached dead_letter_max_bytes, by reason", labels=[*base, "reason"])
        for reason, n in sorted(b.dead_letter.full_by_reason.items()):
            full.add_metric([name, reason], n)
        yield full
        lost = CounterMetricFamily(P + "events_lost", "Events that could be neither delivered nor dead-lettered "
                                   "(the dead-letter file unwritable)", labels=base)
        lost.add_metric([name], b.dead_letter.lost)
        yield lost
        alerts = CounterMetricFamily(P + "alerts_fired", "Alerts made by the rules stage",
                                     labels=[*base, "stage", "rule", "severity"])
        for p in v.rules():
            for (rule, severity), n in sorted(p.fired_by.items()):
                alerts.add_metric([name, p.context.stage, rule, severity], n)
        yield alerts
        theirs = v.videodb_alerts()
        if theirs is not None:
            va = CounterMetricFamily(P + "videodb_alerts", "Events the source passed on on the alert channel: "
                                     "VideoDB's own alerts (alerts_fired counts the rules stage's)", labels=base)
            va.add_metric([name], theirs)
            yield va

        yield from self._live(v)

    def _live(self, v: View) -> Iterator[Metric]:
        """Connection and capture-session families (absent values are simply not exported)."""
        name, b = v.name, v.built
        base = ["pipeline"]
        if b.source is not None and v.role != "worker":
            connected = source_connected(b.source)
            if connected is not None:
                g = GaugeMetricFamily(P + "websocket_connected", "1 while the source's WebSocket is open",
                                      labels=base)
                g.add_metric([name], 1 if connected else 0)
                yield g
            gaps = v.gaps()
            if gaps is not None:
                rc = CounterMetricFamily(P + "websocket_reconnects", "WebSocket reconnects", labels=base)
                rc.add_metric([name], gaps.reconnects)
                ds = CounterMetricFamily(P + "websocket_disconnected_seconds",
                                         "Seconds without a WebSocket connection, the current outage included",
                                         labels=base)
                ds.add_metric([name], gaps.seconds())
                bf = CounterMetricFamily(P + "events_backfilled", "Events fetched after a reconnect, by channel",
                                         labels=[*base, "channel"])
                for ch, n in sorted(gaps.backfilled.items()):
                    bf.add_metric([name, ch], n)
                yield from (rc, ds, bf)
        _, state = v.session_state()
        if b.controller is not None and v.role != "worker":
            g = GaugeMetricFamily(P + "capture_session_state", "1 for the capture session's current state",
                                  labels=[*base, "state"])
            for s in SESSION_STATES:
                g.add_metric([name, s], 1 if state == s else 0)
            yield g
        reloader = getattr(v.rt, "reloader", None)
        if reloader is not None:
            r = CounterMetricFamily(P + "config_reloads", "Config reloads (SIGHUP, --watch) by outcome",
                                    labels=[*base, "outcome"])
            r.add_metric([name, "applied"], reloader.applied)
            r.add_metric([name, "rejected"], reloader.rejected)
            yield r
        hub = getattr(v.rt, "tap_hub", None)
        if hub is not None:
            c = GaugeMetricFamily(P + "tap_clients", "Tap clients attached", labels=base)
            c.add_metric([name], hub.client_count)
            d = CounterMetricFamily(P + "tap_dropped_events", "Events a slow tap client missed", labels=base)
            d.add_metric([name], hub.dropped)
            yield from (c, d)


def registry_for(view: View) -> CollectorRegistry:
    """A fresh registry with the pipeline collector and the process collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PipelineCollector(view))  # type: ignore[arg-type]
    ProcessCollector(registry=reg)
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
