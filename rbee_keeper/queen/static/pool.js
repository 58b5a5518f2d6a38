// Pool: every host (up or why not, heartbeat age), each device's memory, each worker; live.

import { chartsSection } from "./charts.js";
import {
  act, api, bytes, duration, h, num, onPool, pill, replaceKeeping, sinceDoc,
} from "./lib.js";

export const poolPage = {
  title: "Pool",
  mount(root) {
    const tiles = h("section", { class: "tiles", "aria-label": "Summary" });
    const now = h("section", { class: "now", "aria-label": "Running and queued jobs" });
    const hosts = h("section", { class: "hosts", "aria-label": "Hosts" });
    const charts = chartsSection();
    root.append(h("h1", {}, "Pool"), tiles, now, hosts, charts.el, logDialog());
    let seen = "";
    const off = onPool((doc) => {
      replaceKeeping(tiles, summary(doc));
      replaceKeeping(now, activity(doc));
      // rebuilt only when something but the clock changed (ages count on by themselves)
      const key = JSON.stringify(doc.hosts.map((x) => ({ ...x, age_s: null,
        workers: x.workers.map((w) => ({ ...w, uptime_s: null })) })));
      if (key !== seen) {
        seen = key;
        replaceKeeping(hosts, doc.hosts.length ? doc.hosts.map(hostCard)
          : h("p", { class: "muted" }, "No hosts yet: add one with `rbee hosts add`."));
      }
      setClocks(hosts, doc);
    });
    const tick = setInterval(() => tickAges(root), 1000);
    return () => {
      off();
      clearInterval(tick);
      charts.cleanup();
    };
  },
};

function tile(label, value, detail) {
  return h("div", { class: "tile" }, h("div", { class: "tile-value" }, value),
    h("div", { class: "tile-label" }, label), detail ? h("div", { class: "muted small" }, detail) : null);
}

function summary(doc) {
  const t = doc.totals;
  const jobs = t.jobs || {};
  return [
    tile("hosts up", `${t.hosts_up} / ${t.hosts}`),
    tile("devices", t.devices),
    tile("workers", t.workers, `${t.busy} busy`),
    tile("queued", t.queued),
    tile("running", t.running),
    tile("tokens/s now", num(t.tokens_per_sec)),
    tile("jobs finished", (jobs.done || 0) + (jobs.failed || 0) + (jobs.cancelled || 0),
      `${jobs.done || 0} done · ${jobs.failed || 0} failed · ${jobs.cancelled || 0} cancelled`),
  ];
}

function activity(doc) {
  if (!doc.running.length && !doc.queue.length) return [];
  return h("ul", { class: "activity" },
    doc.running.map((j) => h("li", {}, pill(j.state), " ",
      h("a", { href: `#/jobs/${j.id}` }, j.id), ` ${j.model}`,
      j.host ? ` on ${j.host}` : "", ` · ${j.tokens} tokens`)),
    doc.queue.map((j) => h("li", {}, pill("queued"), " ",
      h("a", { href: `#/jobs/${j.id}` }, j.id), ` ${j.model} · position ${j.position}`)));
}

function ageText(age) {
  return age === null || age === undefined ? "never" : `${duration(age)} ago`;
}

// The ages and uptimes of the latest document (the cards may be older than it).
function setClocks(container, doc) {
  for (const x of doc.hosts) {
    const card = container.querySelector(`[data-host="${CSS.escape(x.name)}"]`);
    if (!card) continue;
    const age = card.querySelector("[data-age]");
    if (age) age.dataset.age = x.age_s === null ? "" : String(x.age_s);
    for (const w of x.workers) {
      const up = w.id && card.querySelector(`[data-worker="${CSS.escape(w.id)}"]`);
      if (up) up.dataset.uptime = w.uptime_s ?? "";
    }
  }
  tickAges(container);
}

// Ages and uptimes count on between two pool documents.
function tickAges(root) {
  const extra = sinceDoc();
  for (const el of root.querySelectorAll("[data-age]")) {
    if (el.dataset.age !== "") el.textContent = ageText(Number(el.dataset.age) + extra);
  }
  for (const el of root.querySelectorAll("[data-uptime]")) {
    if (el.dataset.uptime !== "") el.textContent = duration(Number(el.dataset.uptime) + extra);
  }
}

function hostCard(host) {
  const up = host.ok;
  const age = host.age_s === null ? "" : String(host.age_s);
  return h("article", { class: `card host ${up ? "up" : "down"}`, "data-host": host.name,
    "aria-labelledby": `host-${host.name}` },
  h("header", { class: "host-head" },
    h("h2", { id: `host-${host.name}` }, host.name),
    h("span", { class: `pill ${up ? "ok" : "bad"}`, "data-testid": "reach" }, up ? "up" : "down"),
    h("span", { class: "muted small" }, `${host.source} · last heartbeat `,
      h("span", { "data-age": age }, ageText(host.age_s)))),
  host.hostname ? h("p", { class: "muted small" },
    `${host.hostname} · ${host.platform} ${host.machine} · rbee ${host.rbee_version}`) : null,
  !up && host.error ? h("div", { class: "why", role: "note" },
    h("strong", {}, host.error.code), " ", host.error.message,
    host.error.hint ? h("div", { class: "hint" }, host.error.hint) : null) : null,
  h("h3", {}, up ? "Devices" : "Devices (as last seen)"),
  host.devices.length ? host.devices.map(deviceView) : h("p", { class: "muted" }, "none reported"),
  h("h3", {}, "Workers"),
  host.workers.length ? workersTable(host) : h("p", { class: "muted" }, "no workers"));
}

const SEGMENTS = [
  ["rbee", "rbee workers"],
  ["others", "other programs"],
  ["reserve", "reserve"],
  ["available", "free"],
];

function deviceView(d) {
  const label = `${d.backend}:${d.index}`;
  const known = d.total && d.others !== null;
  const words = known ? `${SEGMENTS.map(([k, name]) => `${name} ${bytes(d[k])}`).join(", ")}`
    + ` of ${bytes(d.total)}` : "memory unknown";
  const bar = h("div", { class: "bar", role: "img", "aria-label": `${label}: ${words}` });
  if (known) {
    for (const [key, name] of SEGMENTS) {
      const seg = h("span", { class: `seg seg-${key}`, title: `${name}: ${bytes(d[key])}` });
      seg.style.width = `${(100 * Math.max(0, d[key])) / d.total}%`;
      bar.append(seg);
    }
  }
  return h("div", { class: "device" },
    h("div", { class: "device-head" },
      h("strong", {}, label), " ", h("span", { class: "muted" }, d.name || ""),
      h("span", { class: "device-free" }, known ? `${bytes(d.available)} free of ${bytes(d.total)}`
        : "")),
    bar,
    known ? h("ul", { class: "legend", "aria-hidden": "true" }, SEGMENTS.map(([key, name]) =>
      h("li", {}, h("span", { class: `swatch seg-${key}` }), `${name} ${bytes(d[key])}`))) : null,
    d.limit ? h("p", { class: "muted small" }, `rbee may use ${bytes(d.limit)} here`
      + (d.rbee_estimate ? `; its workers hold ${bytes(d.rbee_estimate)} by estimate` : "")) : null);
}

function cell(label, ...content) {
  return h("td", { "data-label": label }, ...content);
}

function workersTable(host) {
  return h("div", { class: "table-wrap" }, h("table", { class: "workers responsive" },
    h("caption", { class: "sr-only" }, `Workers on ${host.name}`),
    h("thead", {}, h("tr", {}, ["Worker", "Model", "State", "Uptime", "Requests", "Tokens/s",
      ""].map((c) => h("th", { scope: "col" }, c)))),
    // rows keyed by worker: when the order changes, each row (and its buttons) moves whole
    h("tbody", {}, host.workers.map((w, i) => h("tr", { "data-key": `row-${w.id || `new-${i}`}` },
      cell("Worker", w.id ? h("code", {}, w.id) : h("em", {}, "starting…"),
        h("div", { class: "muted small" }, `${w.backend}:${(w.devices || []).join("+")}`)),
      cell("Model", w.model),
      cell("State", pill(w.state)),
      cell("Uptime", h("span", { "data-uptime": w.uptime_s ?? "", "data-worker": w.id || "" },
        duration(w.uptime_s))),
      cell("Requests", w.requests ?? "—",
        w.tokens ? h("div", { class: "muted small" }, `${w.tokens} tokens`) : null),
      cell("Tokens/s", w.tokens_per_sec ? num(w.tokens_per_sec) : "—"),
      cell("", w.id ? h("span", { class: "actions" },
        h("button", { type: "button", class: "small", "data-key": `logs-${host.name}-${w.id}`,
          "aria-label": `Log of ${w.id}`, onclick: () => showLogs(host.name, w.id) }, "Log"),
        host.ok ? h("button", { type: "button", class: "small danger",
          "data-key": `stop-${host.name}-${w.id}`, "aria-label": `Stop ${w.id}`,
          onclick: (e) => act(e.target, () => api("/v2/workers/stop", {
            method: "POST", body: { host: host.name, id: w.id } }), `Stopped ${w.id}`) },
        "Stop") : null) : null))))));
}

function logDialog() {
  return h("dialog", { id: "logs", "aria-labelledby": "logs-title" },
    h("div", { class: "dialog-head" }, h("h2", { id: "logs-title" }, "Log"),
      h("button", { type: "button", onclick: () => document.getElementById("logs").close() },
        "Close")),
    h("pre", { class: "log", tabindex: "0" }));
}

async function showLogs(host, worker) {
  const dialog = document.getElementById("logs");
  dialog.querySelector("h2").textContent = `${worker} on ${host}`;
  const pre = dialog.querySelector("pre");
  pre.textContent = "loading…";
  dialog.showModal();
  try {
    const doc = await api(`/v2/workers/${encodeURIComponent(host)}/${encodeURIComponent(worker)}/logs?lines=300`);
    pre.textContent = doc.lines.join("\n") || "(empty)";
    pre.scrollTop = pre.scrollHeight;
  } catch (err) {
    pre.textContent = `${err.code}: ${err.message}`;
  }
}
