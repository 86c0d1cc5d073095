// olmocr status page: renders the status service's JSON, live over /ws (no reload, no library, no CDN).
// Each message is a whole snapshot; "servers" (one entry per GPU server) when present, else the
// top level is the one server. When the socket closes, or nothing arrives for STALE_MS (the service
// pushes at least every few seconds), the page says "disconnected" and reconnects with backoff.
"use strict";
(function () {
  const STALE_MS = 20000;
  const connection = document.getElementById("connection");
  const serversEl = document.getElementById("servers");
  const summaryEl = document.getElementById("summary");
  const errorEl = document.getElementById("error");
  const updatedEl = document.getElementById("updated");
  let socket = null, lastMessageAt = 0, retryMs = 500, retryTimer = null, lostAt = new Date();

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value; else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  };

  function duration(seconds) {
    seconds = Math.max(0, Math.floor(seconds || 0));
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }
  function clock(t) {  // unix seconds or ISO string -> local HH:MM:SS
    if (t === undefined || t === null) return "";
    const date = typeof t === "number" ? new Date(t * 1000) : new Date(t);
    return isNaN(date) ? String(t) : date.toLocaleTimeString([], {hour12: false});
  }
  function phaseOf(s) {
    if (s.gave_up) return "gave-up";
    const state = (s.state || "unknown").toLowerCase();
    if (state === "running" || state === "starting") return s.health_phase || "starting";
    return state;
  }

  function sparkline(history) {
    const wrap = el("div", {class: "latency"});
    wrap.append(el("p", {class: "section-title"}, "Probe latency"));
    const points = (history || []).filter(p => Array.isArray(p) && p.length >= 2);
    if (!points.length) { wrap.append(el("p", {class: "empty"}, "no probes yet")); return wrap; }
    const width = 300, height = 48, pad = 4;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const values = points.map(p => Number(p[1]) || 0);
    const max = Math.max(...values, 1);
    const x = t => t1 > t0 ? pad + (t - t0) / (t1 - t0) * (width - 2 * pad) : width / 2;
    const y = v => height - pad - v / max * (height - 2 * pad);
    const svg = svgEl("svg", {class: "spark", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
                              role: "img", "aria-label": "probe latency"});
    svg.append(svgEl("polyline", {points: points.map(p => `${x(p[0]).toFixed(1)},${y(Number(p[1]) || 0).toFixed(1)}`).join(" ")}));
    for (const p of points) if (p[2] === false) svg.append(svgEl("circle", {class: "fail", cx: x(p[0]), cy: y(Number(p[1]) || 0), r: 2.5}));
    wrap.append(svg);
    const last = values[values.length - 1];
    const failed = points.filter(p => p[2] === false).length;
    wrap.append(el("p", {class: "spark-caption", "data-field": "latency"},
      `last ${last.toFixed(1)} ms · max ${max.toFixed(1)} ms · ${points.length} probes over ${duration(t1 - t0)}` +
      (failed ? ` · ${failed} failed` : "")));
    return wrap;
  }

  function eventList(title, items, field, text) {
    const wrap = el("div", {}, el("p", {class: "section-title"}, title));
    if (!items || !items.length) { wrap.append(el("p", {class: "empty", "data-field": field}, "none")); return wrap; }
    const list = el("ul", {class: "events", "data-field": field});
    for (const item of items.slice().reverse().slice(0, 5)) list.append(el("li", {}, el("time", {}, clock(item.time)), text(item)));
    wrap.append(list);
    return wrap;
  }

  function serverCard(s, index) {
    const phase = phaseOf(s);
    const name = s.url || (s.port ? `port ${s.port}` : `server ${index + 1}`);
    const gpus = Array.isArray(s.gpus) ? s.gpus.join(",") : s.gpus;
    const card = el("section", {class: `server ${phase}`, "data-server": name});
    const left = el("div", {},
      el("h2", {}, name, " ", el("span", {class: `badge ${phase}`, "data-field": "phase"}, phase === "gave-up" ? "gave up" : phase)),
      el("dl", {},
        el("dt", {}, "Model"), el("dd", {}, s.model || "?"),
        gpus !== undefined && gpus !== null && gpus !== "" ? el("dt", {}, "GPUs") : null,
        gpus !== undefined && gpus !== null && gpus !== "" ? el("dd", {}, gpus) : null,
        el("dt", {}, "State"), el("dd", {"data-field": "state"}, `${s.state || "?"}${s.pid ? ` (pid ${s.pid})` : ""}`),
        el("dt", {}, "Uptime"), el("dd", {"data-field": "uptime", "data-uptime": s.state === "RUNNING" ? s.uptime_seconds || 0 : null,
                                          "data-at": Date.now()}, s.state === "RUNNING" ? duration(s.uptime_seconds) : "not running"),
        el("dt", {}, "Restarts"), el("dd", {"data-field": "restarts"}, String(s.restart_count ?? 0) +
          (s.consecutive_restarts ? ` (${s.consecutive_restarts} in a row)` : "")),
        el("dt", {}, "Health kills"), el("dd", {"data-field": "kills"}, String(s.health_kills ?? 0)),
        el("dt", {}, "Last check"), el("dd", {}, s.last_health_check ? clock(s.last_health_check) : "never")));
    const middle = el("div", {}, sparkline(s.probe_history),
      eventList("Health decisions", s.health_decisions, "decisions", d => `${d.decision}${d.reason ? ": " + d.reason : ""}`));
    const failures = s.recent_failures && s.recent_failures.length ? s.recent_failures
      : (s.last_failure_reason ? [{time: s.last_failure_time, reason: s.last_failure_reason}] : []);
    const right = el("div", {}, eventList("Restart and failure reasons", failures, "reasons", f => f.reason));
    card.append(left, middle, right);
    return card;
  }

  function render(status) {
    const servers = Array.isArray(status.servers) && status.servers.length ? status.servers : [status];
    errorEl.hidden = !status.error;
    errorEl.textContent = status.error || "";
    const healthy = servers.filter(s => s.healthy).length;
    summaryEl.textContent = `${healthy} of ${servers.length} server${servers.length === 1 ? "" : "s"} healthy`;
    summaryEl.dataset.healthy = String(healthy);
    serversEl.replaceChildren(...(status.error && !status.servers && status.state === undefined ? [] : servers.map(serverCard)));
    updatedEl.textContent = `· updated ${new Date().toLocaleTimeString([], {hour12: false})}`;
  }

  function setConnection(state, text) {
    connection.className = `connection ${state}`;
    connection.textContent = text;
    document.body.classList.toggle("disconnected", state === "disconnected");
  }

  function connect() {
    clearTimeout(retryTimer);
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.onopen = () => { retryMs = 500; };
    socket.onmessage = event => {
      lastMessageAt = Date.now();
      setConnection("live", "live");
      try { render(JSON.parse(event.data)); } catch (err) { errorEl.hidden = false; errorEl.textContent = `bad message: ${err}`; }
    };
    socket.onclose = event => {
      socket = null;
      const why = event.code === 1008 || event.code === 4401 ? " (not authorised: reload to sign in)" : "";
      if (!connection.classList.contains("disconnected")) lostAt = new Date();
      const since = lastMessageAt ? ` since ${lostAt.toLocaleTimeString([], {hour12: false})}` : "";
      setConnection("disconnected", `disconnected${since}${why} — retrying`);
      retryTimer = setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  setInterval(() => {  // uptimes tick between messages (the service pushes changes, not every second)
    if (document.body.classList.contains("disconnected")) return;
    for (const node of document.querySelectorAll("[data-uptime]")) {
      node.textContent = duration(Number(node.dataset.uptime) + (Date.now() - Number(node.dataset.at)) / 1000);
    }
  }, 1000);
  setInterval(() => {  // a silent connection (service hung, network gone without a FIN) is a lost one
    if (socket && lastMessageAt && Date.now() - lastMessageAt > STALE_MS) {
      setConnection("disconnected", `disconnected (no update for ${Math.round((Date.now() - lastMessageAt) / 1000)} s) — retrying`);
      socket.close();
    }
  }, 1000);
  connect();
})();
