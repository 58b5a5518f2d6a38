// Jobs: queued, running and finished, filterable; a job's page with its placement (the
// chosen candidate and every rejected one with its reason), timings, text, and Cancel.

import {
  act, ago, api, bytes, clock, errorBox, FINAL, h, ms, num, onPool, pill, replaceKeeping,
} from "./lib.js";

const STATES = ["queued", "placed", "running", "done", "failed", "cancelled"];

function filtersFrom(query) {
  const params = new URLSearchParams(query || "");
  return {
    states: new Set((params.get("state") || "").split(",").filter((s) => STATES.includes(s))),
    model: params.get("model") || "",
    text: params.get("q") || "",
  };
}

function queryOf(f) {
  const params = new URLSearchParams();
  if (f.states.size) params.set("state", [...f.states].join(","));
  if (f.model) params.set("model", f.model);
  if (f.text) params.set("q", f.text);
  const q = params.toString();
  return q ? `#/jobs?${q}` : "#/jobs";
}

export const jobsPage = {
  title: "Jobs",
  mount(root, query) {
    const f = filtersFrom(query);
    const counts = h("p", { class: "muted", "aria-live": "polite" });
    const list = h("div", { class: "table-wrap" }, h("p", { class: "muted" }, "loading…"));
    const modelSelect = h("select", { id: "job-model", onchange: () => apply() },
      h("option", { value: "" }, "all models"));
    const search = h("input", { id: "job-search", type: "search", value: f.text,
      placeholder: "id, host, worker…", oninput: () => apply() });
    const boxes = STATES.map((s) => h("label", { class: "check" },
      h("input", { type: "checkbox", value: s, checked: f.states.has(s),
        onchange: () => apply() }), ` ${s}`));
    root.append(h("h1", {}, "Jobs"),
      h("form", { class: "filters", role: "search", "aria-label": "Filter jobs",
        onsubmit: (e) => e.preventDefault() },
      h("fieldset", {}, h("legend", {}, "State"), boxes),
      h("div", { class: "field" }, h("label", { for: "job-model" }, "Model"), modelSelect),
      h("div", { class: "field" }, h("label", { for: "job-search" }, "Search"), search)),
      counts, list);

    let rows = [];
    let models = new Set();
    const draw = () => {
      const text = search.value.trim().toLowerCase();
      const shown = rows.filter((j) => !text || [j.id, j.host, j.worker, j.model, j.source]
        .some((v) => String(v || "").toLowerCase().includes(text)));
      replaceKeeping(list, jobsTable(shown));
    };
    const load = async () => {
      const params = new URLSearchParams({ limit: "200" });
      const states = [...root.querySelectorAll(".filters input[type=checkbox]:checked")]
        .map((b) => b.value);
      if (states.length) params.set("state", states.join(","));
      if (modelSelect.value) params.set("model", modelSelect.value);
      try {
        const doc = await api(`/v2/tasks?${params}`);
        rows = doc.tasks;
        const c = doc.counts || {};
        counts.textContent = STATES.filter((s) => c[s]).map((s) => `${c[s]} ${s}`).join(" · ")
          || "no jobs yet";
        for (const j of rows) models.add(j.model);
        syncModels();
        draw();
      } catch (err) {
        list.replaceChildren(errorBox(err));
      }
    };
    const syncModels = () => {
      const have = new Set([...modelSelect.options].map((o) => o.value));
      for (const m of [...models].sort()) {
        if (!have.has(m)) modelSelect.append(h("option", { value: m }, m));
      }
    };
    function apply() {
      const next = {
        states: new Set([...root.querySelectorAll(".filters input[type=checkbox]:checked")]
          .map((b) => b.value)),
        model: modelSelect.value, text: search.value.trim(),
      };
      history.replaceState(null, "", queryOf(next));
      load();
    }
    if (f.model) {
      models.add(f.model);
      syncModels();
      modelSelect.value = f.model;
    }
    load();
    // follow the queen: reload when jobs start, end or stream (at most once a second)
    let seen = "";
    let timer = null;
    const off = onPool((doc) => {
      const key = JSON.stringify([doc.totals.jobs, doc.queue.map((j) => j.id),
        doc.running.map((j) => [j.id, j.state, j.tokens])]);
      if (key === seen) return;
      seen = key;
      timer ??= setTimeout(() => { timer = null; load(); }, 1000);
    });
    return () => { off(); clearTimeout(timer); models = new Set(); };
  },
};

function cancelButton(job, label = "Cancel", then = null) {
  return h("button", { type: "button", class: "small danger", "data-key": `cancel-${job.id}`,
    "aria-label": `Cancel ${job.id}`, onclick: async (e) => {
      const out = await act(e.target,
        () => api(`/v2/tasks/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }),
        `Cancelling ${job.id}`);
      if (out && then) then();
    } }, label);
}

function jobsTable(jobs) {
  if (!jobs.length) return h("p", { class: "muted" }, "No jobs match.");
  return h("table", { class: "jobs responsive" },
    h("caption", { class: "sr-only" }, "Jobs, newest first"),
    h("thead", {}, h("tr", {}, ["Job", "State", "Model", "Host", "Source", "Created", "Tokens",
      "TTFT", "Tokens/s", ""].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, jobs.map((j) => h("tr", { "data-job": j.id },
      h("td", { "data-label": "Job" }, h("a", { href: `#/jobs/${j.id}` }, j.id)),
      h("td", { "data-label": "State" }, pill(j.state)),
      h("td", { "data-label": "Model" }, j.model),
      h("td", { "data-label": "Host" }, j.host || "—"),
      h("td", { "data-label": "Source" }, j.source),
      h("td", { "data-label": "Created", title: clock(j.created) }, ago(j.created)),
      h("td", { "data-label": "Tokens" }, j.tokens),
      h("td", { "data-label": "TTFT" }, ms(j.timings?.ttft_ms)),
      h("td", { "data-label": "Tokens/s" }, num(j.timings?.tokens_per_sec)),
      h("td", { "data-label": "" }, FINAL.has(j.state) ? null : cancelButton(j))))));
}

// One job

export const jobPage = {
  title: "Job",
  mount(root, id) {
    const body = h("div", {}, h("p", { class: "muted" }, "loading…"));
    root.append(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")),
      h("h1", {}, "Job ", h("code", {}, id)), body);
    let source = null;
    let closed = false;
    // the page fills these two itself; each render places them as they are
    const text = h("pre", { class: "answer-text", "data-testid": "job-text", tabindex: "0",
      "data-own": true });
    const events = h("ol", { class: "events", "data-own": true });

    const load = async () => {
      try {
        const doc = await api(`/v2/tasks/${encodeURIComponent(id)}`);
        if (closed) return;
        if (!source) text.textContent = doc.text || "";
        // after a cancel, read the job again: its end arrives by the events too, but a
        // stream that dropped meanwhile would leave the page saying "running"
        replaceKeeping(body, jobView(doc, text, events, () => setTimeout(load, 500)));
        if (!FINAL.has(doc.state) && !source) follow();
      } catch (err) {
        body.replaceChildren(errorBox(err));
      }
    };
    // a job still going: its events, from the first, as they happen
    const follow = () => {
      source = new EventSource(`/v2/tasks/${encodeURIComponent(id)}/events`);
      text.textContent = "";
      const node = text.appendChild(document.createTextNode(""));
      const names = ["queued", "placed", "evicting", "downloading", "loading", "started",
        "token", "end", "error"];
      for (const name of names) {
        source.addEventListener(name, (event) => {
          if (!event.data) return; // the EventSource's own "error": a dropped connection
          const data = JSON.parse(event.data);
          if (name === "token") {
            node.appendData(data.t);
            return;
          }
          events.append(eventItem(name, data));
          if (name === "end" || name === "error" || name === "placed" || name === "started") {
            if (name === "end" || name === "error") {
              source.close();
            }
            load();
          }
        });
      }
    };
    load();
    return () => {
      closed = true;
      if (source) source.close();
    };
  },
};

function eventItem(name, data) {
  const words = {
    queued: () => `position ${data.position}`,
    placed: () => `${data.host} ${data.backend}:${(data.devices || [data.device]).join("+")}`,
    evicting: () => `worker ${data.worker} (${data.model}) on ${data.host}: ${data.reason}`,
    downloading: () => `${bytes(data.bytes)}${data.total ? ` of ${bytes(data.total)}` : ""}`,
    loading: () => `on ${data.host}`,
    started: () => `worker ${data.worker} on ${data.host}`,
    end: () => `${data.tokens_out} tokens, ${data.stop_reason}`,
    error: () => `${data.code}: ${data.message}`,
  }[name];
  return h("li", {}, h("strong", {}, name), " ", words ? words() : "");
}

function dl(pairs) {
  return h("dl", { class: "facts" }, pairs.filter(([, v]) => v !== null && v !== undefined
    && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function jobView(doc, text, events, refresh) {
  const p = doc.placement;
  const t = doc.timings || {};
  const r = doc.request || {};
  const final = FINAL.has(doc.state);
  const total = final && doc.updated && doc.created ? (doc.updated - doc.created) * 1000 : null;
  return [
    h("div", { class: "job-head" }, pill(doc.state), " ",
      h("span", {}, doc.model), doc.host ? ` on ${doc.host}` : "",
      doc.position ? ` · position ${doc.position} in the queue` : "",
      final ? null : cancelButton(doc, "Cancel job", refresh)),
    doc.error ? errorBox(doc.error) : null,
    h("div", { class: "two-col" },
      h("section", { class: "card", "aria-labelledby": "placement-h" },
        h("h2", { id: "placement-h" }, "Placement"),
        p ? [
          dl([["Chosen", `${p.host} ${p.backend}:${(p.devices || [p.device]).join("+")}`],
            ["Why", p.reason], ["Path", p.path === "warm" ? "warm (a worker was ready)"
              : "cold (a worker was started)"], ["Worker", doc.worker || p.worker],
            ["Context", p.ctx], ["Estimate", p.estimate ? bytes(p.estimate.total_bytes) : null],
            ["Evicted", (p.evict || []).join(", ")]]),
          h("h3", {}, "Rejected candidates"),
          (p.rejected || []).length ? h("div", { class: "table-wrap" },
            h("table", { class: "rejected responsive" },
              h("thead", {}, h("tr", {}, ["Host", "Device", "Reason"].map((c) =>
                h("th", { scope: "col" }, c)))),
              h("tbody", {}, p.rejected.map((x) => h("tr", {},
                h("td", { "data-label": "Host" }, x.host),
                h("td", { "data-label": "Device" }, x.backend
                  ? `${x.backend}:${(x.devices || [x.device]).filter((d) => d !== null)
                    .join("+")}` : "—"),
                h("td", { "data-label": "Reason" }, x.reason))))))
            : h("p", { class: "muted" }, p.path === "warm"
              ? "None: an idle worker already served the model." : "None: no other candidate."),
        ] : h("p", { class: "muted" }, "Not placed yet.")),
      h("section", { class: "card", "aria-labelledby": "timings-h" },
        h("h2", { id: "timings-h" }, "Timings"),
        dl([["Created", clock(doc.created)], ["Time to first token", ms(t.ttft_ms)],
          ["… at the worker", ms(t.worker_ttft_ms)],
          ["Tokens/s", t.tokens_per_sec ? num(t.tokens_per_sec) : null],
          ["Tokens", doc.tokens], ["Streaming", ms(t.stream_ms)],
          ["Download", t.download_ms ? ms(t.download_ms) : null],
          ["Worker start", t.spawn_ms ? ms(t.spawn_ms) : null],
          ["Submitted to end", total ? ms(total) : null], ["Source", doc.source]]))),
    h("section", { class: "card", "aria-labelledby": "request-h" },
      h("h2", { id: "request-h" }, "Request"),
      r.messages ? h("ol", { class: "messages-view" }, r.messages.map(([role, content]) =>
        h("li", {}, h("strong", {}, role), h("pre", { class: "prompt" }, content))))
        : h("pre", { class: "prompt" }, r.prompt || ""),
      dl([["Max tokens", r.max_tokens], ["Temperature", r.temperature], ["Top-p", r.top_p],
        ["Top-k", r.top_k], ["Seed", r.seed], ["Stop", (r.stop || []).map((s) => JSON.stringify(s))
          .join(", ")]])),
    h("section", { class: "card", "aria-labelledby": "text-h" },
      h("h2", { id: "text-h" }, "Text"), text),
    events.childElementCount ? h("section", { class: "card", "aria-labelledby": "events-h" },
      h("h2", { id: "events-h" }, "Events"), events) : null,
  ];
}
