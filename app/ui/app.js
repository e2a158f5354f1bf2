// olla-py dashboard: polls data (GET /internal/ui/data) every 2 s and redraws. Plain DOM
// and SVG, no library; every text from the server goes in with textContent, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
// What the tests and the measurements read: renders done, the last render's time, the last
// payload's size, and the last fetch error.
window.__olla = { renders: 0, lastRenderMs: null, lastPayloadBytes: null, error: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

const STATE_TEXT = {
  healthy: "healthy", loading: "loading model", draining: "draining", drained: "drained",
  offline: "offline", unhealthy: "unhealthy", auth_error: "key refused", unknown: "not probed yet",
};

function endpointCard(endpoint) {
  const total = endpoint.total_slots;
  const used = endpoint.slots_in_use || 0;
  const share = total ? Math.min(1, used / total) : 0;
  const bar = el("div", { class: "bar", role: "meter", "aria-label": "slots in use",
                          "aria-valuemin": 0, "aria-valuemax": total || 0, "aria-valuenow": used },
                 el("span", { style: `width: ${(share * 100).toFixed(1)}%` }));
  const state = endpoint.status || "unknown";
  return el("article", { class: "card", "data-state": state, "data-name": endpoint.name },
    el("h3", {}, endpoint.name),
    el("span", { class: "state" }, STATE_TEXT[state] || state),
    el("div", { class: "url" }, endpoint.url),
    el("div", { class: "models" }, endpoint.models.length ? endpoint.models.join(", ") : "no models"),
    bar,
    el("div", { class: "figures" },
       el("span", { class: "slots" }, total ? `${used} / ${total} slots` : `${used} / ? slots`),
       el("span", {}, `${endpoint.in_flight} in flight`),
       el("span", {}, `${endpoint.queued} queued`)),
    endpoint.issues ? el("div", { class: "issues" }, endpoint.issues) : null);
}

function table(headers, rows, numeric) {
  return el("table", {},
    el("thead", {}, el("tr", {}, ...headers.map((h, i) =>
      el("th", { class: numeric.includes(i) ? "num" : null, scope: "col" }, h)))),
    el("tbody", {}, ...rows.map(row => el("tr", {}, ...row.map((cell, i) =>
      el("td", { class: numeric.includes(i) ? "num" : null }, cell))))));
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(1)} s` : `${Math.round(value)} ms`;
}

// One chart: lines over the window, a value per second (null: no sample that second).
function chart(title, lines, unit) {
  const width = 600, height = 110, pad = 4, left = 34;
  const values = lines.flatMap(line => line.values.filter(v => v !== null));
  const top = Math.max(1, ...values) * 1.1;
  const n = lines[0].values.length;
  const x = i => left + (i / (n - 1)) * (width - left - pad);
  const y = v => height - 14 - (v / top) * (height - 14 - pad);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                            "aria-label": title });
  plot.append(svg("line", { class: "axis", x1: left, x2: width - pad, y1: y(0), y2: y(0) }));
  const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; return t; };
  plot.append(label(fmt(top / 1.1, unit), { x: 2, y: pad + 8 }));
  plot.append(label("0", { x: 2, y: y(0) }));
  plot.append(label("-15 min", { x: left, y: height - 2 }));
  plot.append(label("now", { x: width - 24, y: height - 2 }));
  let points = 0;
  for (const line of lines) {
    // A run of seconds with values is one polyline; a null breaks it.
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        plot.append(svg("polyline", { points: run.join(" "), fill: "none",
                                      style: `stroke: ${line.color}`, "stroke-width": 1.6,
                                      "vector-effect": "non-scaling-stroke", class: "series" }));
      } else if (run.length === 1) {
        const [cx, cy] = run[0].split(",");
        plot.append(svg("circle", { cx, cy, r: 1.6, style: `fill: ${line.color}`,
                                    class: "series" }));
      }
      run = [];
    };
    line.values.forEach((v, i) => {
      if (v === null) { flush(); return; }
      run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      points += 1;
    });
    flush();
  }
  const latest = lines.map(line => {
    const last = [...line.values].reverse().find(v => v !== null);
    return el("span", {}, el("i", { style: `background: ${line.color}` }),
              `${line.name}: ${last === undefined ? "–" : fmt(last, unit)}`);
  });
  return el("div", { class: "chart", "data-points": points },
            el("h3", {}, title), plot, el("div", { class: "legend" }, ...latest));
}

function fmt(value, unit) {
  if (unit === "ms") return ms(value);
  if (unit === "%") return `${value.toFixed(0)} %`;
  return value >= 100 ? value.toFixed(0) : value.toFixed(value >= 10 ? 1 : 2).replace(/\.?0+$/, "");
}

// Seconds with no request show as 0 for counts, and as gaps for latencies and rates.
function render(data, bytes) {
  const began = performance.now();
  const endpoints = data.endpoints;
  const healthy = endpoints.filter(e => e.status === "healthy").length;
  const inFlight = endpoints.reduce((sum, e) => sum + e.in_flight, 0);
  document.getElementById("summary").textContent =
    `${healthy} of ${endpoints.length} endpoints healthy · ${inFlight} in flight · ` +
    `${data.queue.depth} queued`;
  document.getElementById("updated").textContent =
    `v${data.version} · updated ${new Date(data.timestamp).toLocaleTimeString()}`;
  const cards = document.getElementById("endpoints");
  cards.replaceChildren(...(endpoints.length ? endpoints.map(endpointCard)
                                             : [el("p", { class: "empty" }, "No endpoints configured")]));
  const queue = data.queue.models;
  document.getElementById("queue").replaceChildren(queue.length
    ? table(["Model", "Waiting", "Longest wait"],
            queue.map(q => [q.model, q.depth, ms(q.longest_wait_ms)]), [1, 2])
    : el("p", { class: "empty" }, `Nobody waiting (queue bound ${data.queue.max_size} per model)`));
  const h = data.history;
  document.getElementById("scope").textContent = h.shared ? "(the fleet's, through Redis)"
                                                           : "(this worker's)";
  const charts = [
    chart("Requests per second by outcome", [
      { name: "ok", color: "var(--ok)", values: h.requests.ok },
      { name: "4xx", color: "var(--client)", values: h.requests.client_error },
      { name: "5xx", color: "var(--server)", values: h.requests.server_error }], ""),
    chart("Time to first byte", [
      { name: "p50", color: "var(--p50)", values: h.ttfb_p50_ms },
      { name: "p95", color: "var(--p95)", values: h.ttfb_p95_ms }], "ms"),
    chart("Generated tokens per second", [
      { name: "tokens/s", color: "var(--p50)", values: h.tokens_per_second }], ""),
    chart("Queue depth", [
      { name: "waiting", color: "var(--client)", values: h.queue_depth }], ""),
  ];
  if (data.sticky_sessions || h.cache_hit_rate.some(v => v !== null)) {
    charts.push(chart("KV-cache hit rate (prompt tokens from the cache)", [
      { name: "hit rate", color: "var(--ok)", values: h.cache_hit_rate }], "%"));
  }
  document.getElementById("charts").replaceChildren(...charts);
  document.getElementById("errors").replaceChildren(data.errors.length
    ? table(["Time", "Route", "Model", "Status", "Code"],
            data.errors.map(e => [new Date(e.time).toLocaleTimeString(), e.route, e.model || "–",
                                  e.status, e.code || "–"]), [3])
    : el("p", { class: "empty" }, "No errors in this window"));
  window.__olla.renders += 1;
  window.__olla.lastRenderMs = performance.now() - began;
  window.__olla.lastPayloadBytes = bytes;
}

async function refresh() {
  try {
    const response = await fetch("data", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`data: HTTP ${response.status}`);
    const text = await response.text();
    render(JSON.parse(text), text.length);
    window.__olla.error = null;
  } catch (error) {
    window.__olla.error = String(error);
    document.getElementById("summary").textContent = `Cannot reach the proxy: ${error.message}`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
