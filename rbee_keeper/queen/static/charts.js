// Charts of the last hour, drawn as inline SVG from the queen's samples (GET /v2/samples,
// then `sample` events on the pool stream): tokens/s, queue depth, memory per device.

import { api, bytes, errorBox, h, num, onSample } from "./lib.js";

const WINDOW_S = 3600;
const HEIGHT = 160;
const PAD = { left: 56, right: 10, top: 10, bottom: 24 };

export function chartsSection() {
  const grid = h("div", { class: "chart-grid" });
  const el = h("section", { class: "charts", "aria-labelledby": "charts-title" },
    h("h2", { id: "charts-title" }, "Last hour"), grid);
  let samples = [];
  let delivered = [];
  let interval = 5;
  let loaded = false;
  let width = 0;

  const draw = () => {
    if (!loaded) return;
    const now = Date.now() / 1000;
    samples = samples.filter((s) => s.at >= now - WINDOW_S);
    // drawn at the width of a card, so its text is the page's size
    const card = grid.querySelector(".chart-card");
    const w = Math.max(240, card ? card.clientWidth - 34 : 380);
    const memory = memorySeries(samples);
    grid.replaceChildren(
      chart("Tokens per second", [
        { name: "delivered (1-min average)", points: delivered, gap: Infinity },
        { name: "decode rate of busy workers", points: pick(samples, "tokens_per_sec") }],
      now, interval, w, (v) => num(v)),
      chart("Queue depth", [
        { name: "queued", points: pick(samples, "queue") },
        { name: "running", points: pick(samples, "running") }], now, interval, w,
      (v) => num(v, 0), { step: true, integer: true }),
      chart("Memory used per device", memory, now, interval, w, (v) => bytes(v)),
    );
  };

  const load = () => api(`/v2/samples?since_s=${WINDOW_S}`).then((doc) => {
    samples = doc.samples;
    delivered = doc.throughput.tokens_per_sec;
    interval = doc.interval_s || interval;
    loaded = true;
    draw();
  }).catch((err) => grid.replaceChildren(errorBox(err)));
  load();
  const reload = setInterval(load, 60_000); // the minute's delivered tokens
  const off = onSample((s) => {
    if (!samples.length || s.at > samples[samples.length - 1].at) samples.push(s);
    draw();
  });
  const resize = new ResizeObserver(() => {
    if (grid.clientWidth !== width) {
      width = grid.clientWidth;
      draw();
    }
  });
  resize.observe(grid);
  return { el, cleanup: () => { off(); resize.disconnect(); clearInterval(reload); } };
}

function pick(samples, key) {
  return samples.filter((s) => typeof s[key] === "number").map((s) => [s.at, s[key]]);
}

function memorySeries(samples) {
  const byDevice = new Map();
  for (const s of samples) {
    for (const [device, m] of Object.entries(s.memory || {})) {
      if (m.total === null || m.free === null || m.total === undefined) continue;
      if (!byDevice.has(device)) byDevice.set(device, []);
      byDevice.get(device).push([s.at, m.total - m.free]);
    }
  }
  return [...byDevice.entries()].sort().map(([name, points]) => ({ name, points }));
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * step) return m * step;
  return 10 * step;
}

// One chart: lines over the last hour, broken where samples are missing (the queen was
// down), with min/max labels, a legend with the latest values, and words for screen readers.
function chart(title, series, now, interval, width, format, { step = false, integer = false } = {}) {
  const from = now - WINDOW_S;
  const all = series.flatMap((s) => s.points.map((p) => p[1]));
  const top = integer ? Math.max(2, 2 * Math.ceil(Math.max(0, ...all) / 2))
    : niceMax(Math.max(0, ...all));
  const x = (t) => PAD.left + ((t - from) / WINDOW_S) * (width - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - v / top) * (HEIGHT - PAD.top - PAD.bottom);
  const id = `chart-${title.toLowerCase().replace(/\W+/g, "-")}`;
  const latest = series.map((s) => `${s.name} ${s.points.length
    ? format(s.points[s.points.length - 1][1]) : "no data"}`).join(", ");
  const svg = h("svg:svg", { viewBox: `0 0 ${width} ${HEIGHT}`, width, height: HEIGHT,
    role: "img", "aria-labelledby": `${id}-t ${id}-d`, class: "chart" },
  h("svg:title", { id: `${id}-t` }, title),
  h("svg:desc", { id: `${id}-d` }, `Now: ${latest}.`));
  for (const v of [0, top / 2, top]) {
    svg.append(h("svg:line", { x1: PAD.left, x2: width - PAD.right, y1: y(v), y2: y(v),
      class: "grid" }));
    svg.append(h("svg:text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end",
      class: "axis" }, format(v)));
  }
  for (const [t, label] of [[from, "−60 min"], [from + WINDOW_S / 2, "−30 min"], [now, "now"]]) {
    svg.append(h("svg:text", { x: x(t), y: HEIGHT - 6, class: "axis",
      "text-anchor": t === from ? "start" : t === now ? "end" : "middle" }, label));
  }
  series.forEach((s, i) => {
    let d = "";
    let last = null;
    const gapAfter = s.gap ?? interval * 3; // longer without a sample: the queen was down
    for (const [t, v] of s.points) {
      const gap = last === null || t - last[0] > gapAfter;
      if (gap) d += `M${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      else if (step) d += `H${x(t).toFixed(1)}V${y(v).toFixed(1)}`;
      else d += `L${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      last = [t, v];
    }
    if (s.points.length === 1) {
      const [t, v] = s.points[0];
      svg.append(h("svg:circle", { cx: x(t), cy: y(v), r: 2.5, class: `dot s${i % 6}` }));
    }
    if (d) svg.append(h("svg:path", { d, class: `line s${i % 6}` }));
  });
  const empty = !all.length;
  return h("figure", { class: "card chart-card" },
    h("figcaption", {}, h("strong", {}, title),
      empty ? h("span", { class: "muted small" }, ` no samples yet (one every ${interval} s)`)
        : null),
    svg,
    h("ul", { class: "legend" }, series.map((s, i) => h("li", {},
      h("span", { class: `swatch s${i % 6}` }), `${s.name}: `, h("strong", {},
        s.points.length ? format(s.points[s.points.length - 1][1]) : "—")))));
}
