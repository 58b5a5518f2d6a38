// Playground: a prompt (or chat messages) through the queen's own job API — so the job is on
// the Jobs page like any other — with its answer streamed as it is generated, time to first
// token and tokens/s measured here in the browser, and a Stop button that cancels the job.

import { api, bytes, errorBox, h, ms, num } from "./lib.js";

const ROLES = ["system", "user", "assistant"];

export const playgroundPage = {
  title: "Playground",
  keep: true, // a run goes on while another page is shown, and is still here on return
  mount(root) {
    const model = h("select", { id: "pg-model", name: "model", required: true },
      h("option", { value: "" }, "loading…"));
    const prompt = h("textarea", { id: "pg-prompt", name: "prompt", rows: 6,
      placeholder: "Why is the sky blue?" });
    const messages = h("ol", { class: "messages" });
    const modePrompt = h("input", { type: "radio", name: "mode", value: "prompt", checked: true,
      id: "pg-mode-prompt" });
    const modeChat = h("input", { type: "radio", name: "mode", value: "chat", id: "pg-mode-chat" });
    const field = (id, label, input) => h("div", { class: "field" },
      h("label", { for: id }, label), input);
    const maxTokens = h("input", { id: "pg-max", type: "number", min: 1, max: 1000000,
      value: "128", required: true });
    const temperature = h("input", { id: "pg-temp", type: "number", min: 0, max: 5,
      step: 0.05, value: "0.7" });
    const topP = h("input", { id: "pg-top-p", type: "number", min: 0.01, max: 1, step: 0.01,
      value: "0.95" });
    const seed = h("input", { id: "pg-seed", type: "number", min: 0, step: 1,
      placeholder: "random" });
    const stop = h("textarea", { id: "pg-stop", rows: 2, placeholder: "one per line" });
    const run = h("button", { type: "submit", class: "primary", id: "pg-run" }, "Run");
    const stopButton = h("button", { type: "button", class: "danger", id: "pg-stop-button",
      disabled: true }, "Stop");
    const promptBox = h("div", { class: "prompt-box" }, field("pg-prompt", "Prompt", prompt));
    const chatBox = h("div", { class: "chat-box", hidden: true },
      h("span", { class: "label" }, "Messages"), messages,
      h("button", { type: "button", class: "small", onclick: () => addMessage("user", "") },
        "Add message"));

    const status = h("p", { id: "pg-status", class: "status", role: "status" },
      "Choose a model, write a prompt, Run (Ctrl+Enter).");
    const progress = h("progress", { max: 100, hidden: true, "aria-label": "Download" });
    const stats = h("dl", { class: "stats", "aria-label": "Figures of this run" });
    const answer = h("pre", { id: "pg-answer", class: "answer-text", tabindex: "0",
      "aria-label": "Answer" });
    const form = h("form", { class: "card playground-form", "aria-label": "Prompt" },
      field("pg-model", "Model", model),
      h("fieldset", { class: "mode" }, h("legend", {}, "Input"),
        h("label", { class: "check" }, modePrompt, " Plain prompt"),
        h("label", { class: "check" }, modeChat, " Chat messages")),
      promptBox, chatBox,
      h("fieldset", { class: "sampling" }, h("legend", {}, "Sampling"),
        field("pg-max", "Max tokens", maxTokens), field("pg-temp", "Temperature", temperature),
        field("pg-top-p", "Top-p", topP), field("pg-seed", "Seed", seed),
        field("pg-stop", "Stop sequences", stop)),
      h("div", { class: "actions" }, run, stopButton));
    root.append(h("h1", {}, "Playground"),
      h("div", { class: "playground" }, form,
        h("section", { class: "card answer", "aria-labelledby": "answer-h" },
          h("h2", { id: "answer-h" }, "Answer"), status, progress, stats, answer)));

    function addMessage(role, content) {
      const select = h("select", { "aria-label": "Role" },
        ROLES.map((r) => h("option", { value: r, selected: r === role }, r)));
      const text = h("textarea", { rows: 3, "aria-label": "Content" });
      text.value = content;
      const item = h("li", { class: "msg" }, select, text,
        h("button", { type: "button", class: "small", "aria-label": "Remove this message",
          onclick: () => item.remove() }, "Remove"));
      messages.append(item);
      text.focus();
    }
    addMessage("system", "You are a helpful assistant.");
    addMessage("user", "");
    const syncMode = () => {
      promptBox.hidden = modeChat.checked;
      chatBox.hidden = !modeChat.checked;
    };
    modePrompt.addEventListener("change", syncMode);
    modeChat.addEventListener("change", syncMode);

    api("/v2/models").then((doc) => {
      // models some host has first, loaded ones first of all
      const ranked = [...doc.models].sort((a, b) => (b.loaded.length > 0) - (a.loaded.length > 0)
        || (b.hosts.length > 0) - (a.hosts.length > 0) || a.id.localeCompare(b.id));
      model.replaceChildren(...ranked.map((m) => h("option", { value: m.id },
        m.id + (m.loaded.length ? " (loaded)" : m.hosts.length ? " (on a host)" : ""))));
    }).catch((err) => status.replaceChildren(errorBox(err)));

    let current = null; // {id, source}

    const setStats = (pairs) => {
      stats.replaceChildren(...pairs.flatMap(([k, v, testid]) =>
        [h("dt", {}, k), h("dd", { "data-testid": testid }, v)]));
    };

    const body = () => {
      const out = {
        model: model.value, max_tokens: Number(maxTokens.value),
        temperature: Number(temperature.value), top_p: Number(topP.value),
        stop: stop.value.split("\n").filter((s) => s !== ""),
      };
      if (seed.value !== "") out.seed = Number(seed.value);
      if (modeChat.checked) {
        out.messages = [...messages.querySelectorAll("li")].map((li) => ({
          role: li.querySelector("select").value, content: li.querySelector("textarea").value,
        })).filter((m) => m.content !== "");
      } else {
        out.prompt = prompt.value;
      }
      return out;
    };

    async function start(event) {
      event.preventDefault();
      if (current) return;
      const t0 = performance.now();
      answer.replaceChildren();
      const node = answer.appendChild(document.createTextNode(""));
      progress.hidden = true;
      let tokens = 0;
      let first = null;
      let last = null;
      const figures = () => {
        const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : null;
        return [["Time to first token", first === null ? "—" : ms(first - t0), "ttft"],
          ["Tokens/s", rate === null ? "—" : num(rate), "rate"], ["Tokens", tokens, "tokens"]];
      };
      run.disabled = true;
      status.textContent = "Submitting…";
      let job;
      try {
        job = await api("/v2/tasks", { method: "POST", body: body() });
      } catch (err) {
        status.replaceChildren(errorBox(err));
        run.disabled = false;
        return;
      }
      const link = h("a", { href: `#/jobs/${job.id}`, "data-testid": "job-link" }, job.id);
      setStats([...figures(), ["Job", link, "job"]]);
      stopButton.disabled = false;
      const source = new EventSource(`/v2/tasks/${encodeURIComponent(job.id)}/events`);
      current = { id: job.id, source };
      const finish = () => {
        source.close();
        current = null;
        run.disabled = false;
        stopButton.disabled = true;
        progress.hidden = true;
      };
      const on = (name, fn) => source.addEventListener(name, (e) => {
        if (e.data !== undefined) fn(JSON.parse(e.data));
      });
      on("queued", (d) => { status.textContent = `Queued (position ${d.position})…`; });
      on("placed", (d) => {
        status.textContent = `Placed on ${d.host} ${d.backend}:${(d.devices || [d.device])
          .join("+")}: ${d.reason}`;
      });
      on("evicting", (d) => {
        status.textContent = `Stopping idle worker ${d.worker} (${d.model}) on ${d.host} to make room…`;
      });
      on("downloading", (d) => {
        progress.hidden = false;
        if (d.total) progress.value = (100 * (d.bytes || 0)) / d.total;
        status.textContent = `Downloading the model: ${bytes(d.bytes)}`
          + (d.total ? ` of ${bytes(d.total)}` : "");
      });
      on("loading", (d) => {
        progress.hidden = true;
        status.textContent = `Loading the model on ${d.host}…`;
      });
      on("started", (d) => { status.textContent = `Generating on ${d.worker} (${d.host})…`; });
      on("token", (d) => {
        node.appendData(d.t);
        last = performance.now();
        if (first === null) first = last;
        tokens += 1;
        if (tokens === 1 || tokens % 8 === 0) setStats([...figures(), ["Job", link, "job"]]);
      });
      on("end", (d) => {
        finish();
        const cancelled = d.stop_reason === "CANCELLED";
        status.textContent = cancelled ? `Stopped after ${tokens} tokens.`
          : `Done: ${d.tokens_out} tokens (${d.stop_reason}).`;
        setStats([...figures(), ["Worker's time to first token", ms(d.ttft_ms), "worker-ttft"],
          ["Worker's tokens/s", num(d.tokens_per_sec), "worker-rate"],
          ["Stop reason", d.stop_reason, "stop-reason"], ["Job", link, "job"]]);
      });
      on("error", (d) => {
        finish();
        status.replaceChildren(errorBox(d));
        setStats([...figures(), ["Job", link, "job"]]);
      });
      source.addEventListener("error", (e) => {
        if (e.data === undefined && source.readyState === EventSource.CLOSED && current) {
          finish();
          status.textContent = "Lost the stream; the job's page has what became of it.";
        }
      });
    }

    form.addEventListener("submit", start);
    form.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
    });
    stopButton.addEventListener("click", async () => {
      if (!current) return;
      stopButton.disabled = true;
      status.textContent = "Stopping…";
      try {
        await api(`/v2/tasks/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
      } catch (err) {
        status.replaceChildren(errorBox(err));
      }
    });
    return null;
  },
};
