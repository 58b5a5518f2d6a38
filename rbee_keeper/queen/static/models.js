// Models: the catalog and what every host has and has loaded; download a model to a host
// (with progress), start and stop workers, set a model's idle TTL.

import {
  act, api, bytes, dirty, duration, errorBox, h, onPool, pill, replaceKeeping, toast,
} from "./lib.js";

export const modelsPage = {
  title: "Models",
  mount(root) {
    const ops = h("section", { class: "ops", "aria-label": "Downloads and starts" });
    const table = h("section", { "aria-label": "Models" }, h("p", { class: "muted" }, "loading…"));
    root.append(h("h1", {}, "Models"),
      h("p", { class: "muted" }, "The catalog, and every model a host has. Downloads resume "
        + "and are verified; a started worker is scheduled onto and stopped after its idle TTL "
        + "like the ones the queen starts itself."),
      ops, table);
    let models = null;
    let pool = null;
    let seen = "";
    let fetching = null;

    const render = () => {
      if (models && pool) replaceKeeping(table, modelsTable(models, pool));
    };
    const refetch = () => {
      fetching ??= api("/v2/models").then((doc) => {
        models = doc.models;
        render();
      }).catch((err) => table.replaceChildren(errorBox(err))).finally(() => { fetching = null; });
    };
    const off = onPool((doc) => {
      pool = doc;
      replaceKeeping(ops, opsList(doc.ops));
      // what a host has or runs, and the state of every op: when it changes, ask again
      const key = JSON.stringify([doc.hosts.map((x) => [x.name, x.ok, x.models,
        x.workers.map((w) => [w.id, w.model, w.state])]), doc.ops.map((o) => o.state)]);
      if (key !== seen) {
        seen = key;
        refetch();
      }
    });
    return off;
  },
};

function opsList(ops) {
  if (!ops.length) return [];
  const sorted = [...ops].sort((a, b) => b.started - a.started);
  return [h("h2", {}, "Downloads and starts"), h("ul", { class: "op-list" }, sorted.map(opItem))];
}

function opItem(op) {
  const verb = op.kind === "download" ? "Download" : "Start worker";
  const pct = op.total ? Math.min(100, (100 * (op.bytes || 0)) / op.total) : null;
  const what = op.state === "running"
    ? (op.phase === "downloading" ? `downloading ${bytes(op.bytes || 0)}`
      + (op.total ? ` of ${bytes(op.total)}` : "") : op.phase === "loading"
      ? "loading the model" : "starting")
    : op.state === "done" ? (op.worker ? `worker ${op.worker} ready` : "done")
      : `${op.error?.code}: ${op.error?.message}`;
  const progress = h("progress", { max: 100, "aria-label": `${verb} ${op.model} to ${op.host}` });
  if (op.state === "done") progress.value = 100;
  else if (pct !== null) progress.value = pct;
  return h("li", { class: `op op-${op.state}`, "data-op": op.id },
    h("div", {}, h("strong", {}, `${verb} `), h("code", {}, op.model), ` → ${op.host} `,
      pill(op.state === "running" ? "running" : op.state === "done" ? "done" : "failed")),
    op.state === "failed" ? null : progress,
    h("div", { class: "muted small" }, what,
      op.finished ? ` · took ${duration(op.finished - op.started)}` : ""),
    op.state === "failed" && op.error?.hint ? h("div", { class: "hint" }, op.error.hint) : null);
}

function modelsTable(models, pool) {
  const hostsUp = pool.hosts.filter((x) => x.ok).map((x) => x.name);
  return h("div", { class: "table-wrap" }, h("table", { class: "models responsive" },
    h("caption", { class: "sr-only" }, "Models"),
    h("thead", {}, h("tr", {}, ["Model", "Size", "On hosts", "Loaded", "Idle TTL",
      "On a host"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, models.map((m) => modelRow(m, hostsUp)))));
}

// A control of the row a button is in. Handlers read their row through the DOM, not through
// the elements they were built with: a live update keeps the row's elements and gives them
// the latest render's handlers (see replaceKeeping).
function inRow(event, what) {
  const row = event.target.closest("tr");
  return row.querySelector(`[data-key="${CSS.escape(`${what}-${row.dataset.model}`)}"]`);
}

function hostOf(event) {
  return inRow(event, "host").value;
}

function modelRow(m, hostsUp) {
  const key = (what) => `${what}-${m.id}`;
  const hostSelect = h("select", { "data-key": key("host"), onchange: dirty,
    "aria-label": `Host for ${m.id}` },
  hostsUp.map((name) => h("option", { value: name }, name)));
  const canDownload = m.in_catalog || String(m.source || "").match(/^(hf|https|file):/);
  const ttl = h("input", { type: "number", min: 0, step: 1, inputmode: "numeric",
    "data-key": key("ttl"), oninput: dirty, class: "ttl",
    value: m.ttl === null || m.ttl === undefined ? "" : String(m.ttl),
    placeholder: `${m.default_ttl}`, "aria-label": `Idle TTL of ${m.id}, seconds` });
  return h("tr", { "data-model": m.id },
    h("td", { "data-label": "Model" }, h("code", {}, m.id),
      m.name && m.name !== m.id ? h("div", { class: "small" }, m.name) : null,
      h("div", { class: "muted small source" }, m.source || "")),
    h("td", { "data-label": "Size", class: "nowrap" }, m.size ? bytes(m.size) : "—"),
    h("td", { "data-label": "On hosts" }, m.hosts.length
      ? h("ul", { class: "chips" }, m.hosts.map((x) => h("li", { class: "chip" }, x)))
      : h("span", { class: "muted" }, "none")),
    h("td", { "data-label": "Loaded" }, m.loaded.length
      ? h("ul", { class: "chips" }, m.loaded.map((w) => h("li", { class: "chip" },
        `${w.host} ${w.backend}:${w.device} `, pill(w.state), " ",
        h("button", { type: "button", class: "small danger", "data-key": key(`stop-${w.worker}`),
          "aria-label": `Stop worker ${w.worker} on ${w.host}`,
          onclick: (e) => act(e.target, () => api("/v2/workers/stop", {
            method: "POST", body: { host: w.host, id: w.worker } }),
          `Stopped ${w.worker}`) }, "Stop"))))
      : h("span", { class: "muted nowrap" }, "no worker")),
    h("td", { "data-label": "Idle TTL" }, h("div", { class: "inline-form nowrap" }, ttl, " s ",
      h("button", { type: "button", class: "small", "data-key": key("ttl-save"),
        onclick: (e) => saveTtl(e.target, m.id, inRow(e, "ttl")) }, "Set"))),
    h("td", { "data-label": "On a host" }, hostsUp.length ? h("div", { class: "inline-form nowrap" },
      hostSelect,
      h("button", { type: "button", class: "small", "data-key": key("download"),
        disabled: !canDownload, title: canDownload ? null : "no source to download from",
        onclick: (e) => act(e.target, () => api("/v2/models/download", {
          method: "POST", body: { host: hostOf(e), model: m.id } }),
        `Downloading ${m.id} to ${hostOf(e)}`) }, "Download"),
      h("button", { type: "button", class: "small", "data-key": key("start"),
        onclick: (e) => act(e.target, () => api("/v2/workers/start", {
          method: "POST", body: { host: hostOf(e), model: m.id } }),
        `Starting a worker for ${m.id} on ${hostOf(e)}`) }, "Start worker"))
      : h("span", { class: "muted" }, "no host up")));
}

async function saveTtl(button, model, input) {
  const raw = input.value.trim();
  const ttl = raw === "" ? null : Number(raw);
  if (ttl !== null && (!Number.isFinite(ttl) || ttl < 0)) {
    toast("The TTL is a number of seconds (0: never stop; empty: the default)", "error");
    return;
  }
  const done = ttl === null ? `${model}: default idle TTL` : ttl === 0
    ? `${model}: its workers are never stopped for idling` : `${model}: idle TTL ${ttl} s`;
  if (await act(button, () => api(`/v2/models/${encodeURIComponent(model)}/ttl`, {
    method: "PUT", body: { ttl } }), done) !== null) input.dataset.dirty = "";
}
