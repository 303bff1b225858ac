// The pipeline's status page: polls /api/status every second and follows /tap. No build step, no CDN.
// Meeting content is untrusted: it only ever goes into textContent, never into HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let prev = null, prevTime = 0, points = null, tapAt = null, tapCtl = null, paused = false;
const MAX_EVENTS = 100;
const MAX_TEXT = 1000;  // characters of an event's text in the live tail

// Any value as text, never throwing: fields come off the wire, and String() of {"toString": 1} throws.
function txt(v) {
  if (v === undefined || v === null) return "";
  if (typeof v !== "object") return String(v);
  try { return JSON.stringify(v); } catch (e) { return "?"; }
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = txt(text);
  return e;
}
const fmt = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
const rate = (n) => n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(1);
// a sink's latency cell: how long a batch has been in it when that is a while (stuck), else the last batch's
// latency, with its age once it is a few seconds old (it is not current)
function latency(k) {
  if (k.writing_for != null) return "writing " + secs(k.writing_for);
  if (k.flushing_for != null) return "flushing " + secs(k.flushing_for);
  if (k.latency_age != null && k.latency != null) return secs(k.latency) + ", " + secs(k.latency_age) + " ago";
  return secs(k.latency);
}

function secs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 0.01) return (s * 1000).toFixed(1) + " ms";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " days";
}
function badge(id, text, level) {
  const b = $(id); b.hidden = false; b.textContent = text; b.className = "badge " + level;
}

// An event's receipt time as "YYYY-MM-DD HH:MM:SS": its `ts`, else `unix_ts`. Both come with the event, so
// either may be anything (a number, an object, a year past 275760 that Date cannot show): then "".
function eventClock(ev) {
  let iso = typeof ev.ts === "string" ? ev.ts : "";
  if (!iso && typeof ev.unix_ts === "number") {
    const d = new Date(ev.unix_ts * 1000);
    if (!isNaN(d.getTime())) iso = d.toISOString();
  }
  return iso.replace("T", " ").replace("Z", "").slice(0, 19);
}

function perSecond(now, key, value) {
  if (!prev || !(key in prev.values)) return 0;
  const dt = (now - prevTime) / 1000;
  return dt > 0 ? Math.max(0, (value - prev.values[key]) / dt) : 0;
}

function node(title, kind, r, counts) {
  const n = el("div", "node");
  n.dataset.stage = title;
  n.append(el("div", "kind", kind), el("div", "title", title), el("div", "rate", rate(r) + "/s"),
           el("div", "counts", counts));
  return n;
}

function render(s) {
  const now = Date.now(), values = {};
  $("name").textContent = s.pipeline;
  const notReady = Object.entries(s.ready);
  if (notReady.length) badge("ready", "not ready: " + notReady.map(([k, v]) => k + " " + v).join("; "), "warn");
  else badge("ready", "ready", "ok");
  if (s.source && s.source.connected !== null) {
    const rc = s.source.reconnects ? ` (${s.source.reconnects} reconnects)` : "";
    const down = s.source.disconnected_for != null ? " for " + secs(s.source.disconnected_for) : "";
    badge("ws", "WebSocket " + (s.source.connected ? "connected" : "disconnected" + down) + rc,
          s.source.connected ? "ok" : "bad");
  }
  if (s.session) {
    const st = s.session.state || "none";
    badge("session", "session " + st, st === "active" ? "ok" : (st === "failed" ? "bad" : "warn"));
  }
  if (s.sessions) badge("session", "sessions " + s.sessions.live + " live", "ok");
  $("uptime").textContent = "up " + secs(s.uptime) + (s.lag !== null ? " · lag " + secs(s.lag) : "") +
    (s.quiet_for != null ? " · no events for " + secs(s.quiet_for) : "");

  const graph = $("graph"); graph.replaceChildren();
  s.stages.forEach((st, i) => {
    values["in:" + st.name] = st.in;
    const r = perSecond(now, "in:" + st.name, st.in);
    const counts = st.kind === "source"
      ? `read ${fmt(st.in)} · rejected ${fmt(st.dropped)}`
      : `in ${fmt(st.in)} · out ${fmt(st.out)} · dropped ${fmt(st.dropped)}` + (st.errors ? ` · errors ${fmt(st.errors)}` : "");
    if (i) graph.append(el("div", "arrow", "→"));
    graph.append(node(st.name, st.kind, r, counts));
  });
  const fan = el("div", "fan");
  const body = $("sinks").tBodies[0]; body.replaceChildren();
  for (const k of s.sinks) {
    values["w:" + k.name] = k.written;
    const r = perSecond(now, "w:" + k.name, k.written);
    fan.append(node(k.name, "sink", r, `written ${fmt(k.written)} · queued ${fmt(k.queue)}`));
    const tr = el("tr");
    tr.append(el("td", "mono", k.name), el("td", "num", fmt(k.written)), el("td", "num", rate(r)),
              el("td", "num", fmt(k.queue)), el("td", "num", latency(k)),
              el("td", "num", fmt(k.errors)), el("td", "num", k.spool_bytes === null ? "–" : fmt(k.spool_bytes) + " B"));
    body.append(tr);
  }
  if (s.sinks.length) { graph.append(el("div", "arrow", "→")); graph.append(fan); }
  $("totals").textContent = `rule alerts ${fmt(s.alerts_fired)}` +
    (s.videodb_alerts != null ? ` · videodb alerts ${fmt(s.videodb_alerts)}` : "") +
    ` · dead-lettered ${fmt(s.dead_lettered)}` +
    (s.lost ? ` · LOST ${fmt(s.lost)} (could not be dead-lettered)` : "") +
    (s.dead_letter_full ? ` · NOT DEAD-LETTERED ${fmt(s.dead_letter_full)} (the dead-letter file is full)` : "");

  const ab = $("alerts").tBodies[0]; ab.replaceChildren();
  for (const a of s.alerts.slice().reverse()) {
    const d = a.data || {}, sev = txt(d.severity || "info");
    const when = eventClock(a);
    const tr = el("tr", "alert-row");
    tr.append(el("td", "mono", when), el("td", "sev-" + sev.replace(/[^a-z]/g, ""), sev),
              el("td", "mono", d.event_label || ""), el("td", "mono", a.rtstream_name || a.rtstream_id || ""),
              el("td", "", d.text || ""));
    ab.append(tr);
  }
  $("no-alerts").hidden = s.alerts.length > 0;
  prev = { values }; prevTime = now;

  if (!points && s.points) {
    points = s.points;
    const sel = $("at");
    for (const p of points) sel.append(el("option", "", p));
    const procs = points.filter((p) => p.startsWith("stages["));
    tapAt = procs.length ? procs[procs.length - 1] : points[0];
    sel.value = tapAt;
    sel.onchange = () => { tapAt = sel.value; $("events").replaceChildren(); follow(); };
    follow();
  }
}

async function poll() {
  try {
    const r = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) { location.reload(); return; }
    render(await r.json());
  } catch (e) {
    badge("ready", "pipeline not reachable", "bad");
  }
}

function eventLine(ev) {
  const li = el("li");
  const ch = ev.channel || (ev.event ? "session" : "?");
  const d = ev.data && typeof ev.data === "object" ? ev.data : {};
  if (ch === "alert") li.className = "alert";
  const where = ev.rtstream_name || ev.rtstream_id || "";
  let text = d.text || (ev.event ? ev.event : "");
  if (ch === "alert") text = `[${txt(d.severity || "alert")} ${txt(d.event_label)}] ` + txt(text);
  text = txt(text);  // events come in any size: a line shows the start of a long text
  if (text.length > MAX_TEXT) text = text.slice(0, MAX_TEXT - 1) + "…";
  li.append(el("span", "ch", txt(ch).slice(0, 100)), " ", el("span", "muted", txt(where).slice(0, 100)), " ", text);
  return li;
}

function addLine(li) {
  if (paused) return;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

async function follow() {
  if (tapCtl) tapCtl.abort();
  const ctl = new AbortController(); tapCtl = ctl;
  $("tap-state").textContent = "following " + tapAt;
  try {
    const r = await fetch("/tap?at=" + encodeURIComponent(tapAt), { credentials: "same-origin", signal: ctl.signal });
    if (!r.ok) {  // 503: every tap place is taken for now (asked again below); 400, 401, 403: a reload may help
      $("tap-state").textContent = "tap refused: HTTP " + r.status + (r.status === 503 ? " (asking again…)" : "");
      if (r.status === 503 && tapCtl === ctl) setTimeout(() => { if (tapCtl === ctl) follow(); }, 2000);
      return;
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let type = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) type = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue;
        const msg = JSON.parse(data);
        if (type === "message") for (const ev of msg.slice(-MAX_EVENTS)) addLine(eventLine(ev));
        else if (type === "dropped") addLine(el("li", "note", `… this view fell behind: ${msg.dropped} events skipped`));
        else if (type === "end") $("tap-state").textContent = "tap ended: " + msg.reason;
      }
    }
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  if (tapCtl === ctl) { $("tap-state").textContent += " (reconnecting…)"; setTimeout(follow, 2000); }
}

$("pause").onclick = () => { paused = !paused; $("pause").textContent = paused ? "resume" : "pause"; };
poll();
setInterval(poll, 1000);
