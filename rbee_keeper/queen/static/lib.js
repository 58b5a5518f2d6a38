// Shared helpers of the queen's web UI: DOM building, the API, the pool's live stream,
// number formats. Untrusted text (model names, prompts, answers, log lines, error
// messages) only ever enters the page as text nodes or attribute values, never as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

// The handlers h() attached to each element, so that a live update that keeps an element
// can give it the handlers of the render that replaces it.
const handlers = new WeakMap();

// h("tag", {attr: value, onclick: fn}, ...children): an element; strings become text nodes.
export function h(tag, attrs, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
      if (!handlers.has(el)) handlers.set(el, []);
      handlers.get(el).push([key.slice(2), value]);
    } else if (key === "value" && !svg) {
      el.value = value;
    } else if (key === "checked" || key === "selected" || key === "disabled") {
      el[key] = Boolean(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Update a container to the children of a new render, keeping what the user was doing. An
// element the new render draws again (same tag, and the same key where it has one) is kept,
// not replaced: a pressed or hovered button, an open <select>, the focus and a selection
// stay put while the page live-updates. A kept element takes the new render's attributes,
// text and handlers, so what it does is always what the latest render says; handlers must
// therefore reach the other controls of their row through the DOM (event.target.closest),
// not through an element captured when they were built. Values typed into controls that
// carry data-key survive too. A node marked data-own (one the page keeps and fills itself,
// such as a streamed answer) is placed as it is.
export function replaceKeeping(container, ...children) {
  const focused = document.activeElement;
  const focusKey = focused && container.contains(focused) ? focused.dataset.key : null;
  const values = new Map();
  for (const el of container.querySelectorAll("[data-key]")) {
    if ("value" in el && el.dataset.dirty === "1") values.set(el.dataset.key, el.value);
  }
  const next = document.createDocumentFragment();
  append(next, children);
  morphChildren(container, next);
  for (const el of container.querySelectorAll("[data-key]")) {
    if (values.has(el.dataset.key) && el.dataset.dirty !== "1") {
      el.value = values.get(el.dataset.key);
      el.dataset.dirty = "1";
    }
  }
  if (focusKey && !container.contains(document.activeElement)) {
    const again = container.querySelector(`[data-key="${CSS.escape(focusKey)}"]`);
    if (again) again.focus({ preventScroll: true });
  }
}

// What identifies an element among its siblings across renders.
const KEYS = ["data-key", "data-job", "data-host", "data-model", "data-op", "data-worker", "id"];

function keyOf(node) {
  if (node.nodeType !== Node.ELEMENT_NODE) return null;
  for (const name of KEYS) {
    if (node.hasAttribute(name)) return `${name}=${node.getAttribute(name)}`;
  }
  return null;
}

function owned(node) {
  return node.nodeType === Node.ELEMENT_NODE && node.hasAttribute("data-own");
}

function sameKind(a, b) {
  return a.nodeType === b.nodeType && a.nodeName === b.nodeName && !owned(a) && !owned(b);
}

// Make `parent`'s children those of `next`, reusing a keyed child of the same key wherever
// it now stands, and an unkeyed one in order when it has the same tag.
function morphChildren(parent, next) {
  const keyed = new Map();
  const unkeyed = [];
  for (const node of parent.childNodes) {
    const key = keyOf(node);
    if (key === null) unkeyed.push(node);
    else keyed.set(key, node);
  }
  let pos = 0;
  for (const fresh of [...next.childNodes]) {
    const key = keyOf(fresh);
    let old = null;
    if (key !== null) {
      old = keyed.get(key) ?? null;
      keyed.delete(key);
    } else if (unkeyed.length) {
      old = unkeyed.shift();
    }
    let node = fresh;
    if (old && sameKind(old, fresh)) {
      morph(old, fresh);
      node = old;
    }
    const here = parent.childNodes[pos] ?? null;
    if (here !== node) parent.insertBefore(node, here);
    pos += 1;
  }
  while (parent.childNodes.length > pos) parent.lastChild.remove();
}

function morph(old, fresh) {
  if (old.nodeType !== Node.ELEMENT_NODE) {
    if (old.nodeValue !== fresh.nodeValue) old.nodeValue = fresh.nodeValue;
    return;
  }
  for (const { name } of [...old.attributes]) {
    if (name !== "data-dirty" && !fresh.hasAttribute(name)) old.removeAttribute(name);
  }
  for (const { name, value } of fresh.attributes) {
    if (old.getAttribute(name) === value) continue;
    // styles through the CSSOM: the page's CSP refuses a style attribute set as markup
    if (name === "style") old.style.cssText = fresh.style.cssText;
    else old.setAttribute(name, value);
  }
  for (const [type, fn] of handlers.get(old) || []) old.removeEventListener(type, fn);
  const theirs = handlers.get(fresh) || [];
  for (const [type, fn] of theirs) old.addEventListener(type, fn);
  handlers.set(old, theirs);
  morphChildren(old, fresh);
  // what the new render set as properties, unless the user has changed them since
  const control = fresh instanceof HTMLInputElement || fresh instanceof HTMLSelectElement
    || fresh instanceof HTMLTextAreaElement;
  if (control && old.dataset.dirty !== "1") {
    if (old.value !== fresh.value) old.value = fresh.value;
    if (fresh instanceof HTMLInputElement && old.checked !== fresh.checked) {
      old.checked = fresh.checked;
    }
  }
}

// Mark a control as edited, so a live rebuild keeps what was typed.
export function dirty(event) {
  event.target.dataset.dirty = "1";
}

export class ApiError extends Error {
  constructor(error, status) {
    super(error.message || `HTTP ${status}`);
    this.code = error.code || `HTTP_${status}`;
    this.hint = error.hint || "";
    this.status = status;
  }
}

// The queen's API, with the sign-in cookie. State-changing calls carry X-Rbee-UI: the queen
// refuses cookie-borne ones without it (a cross-site form cannot send it).
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-Rbee-UI"] = "1";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    location.assign("/signin");
    throw new ApiError({ code: "UNAUTHORIZED", message: "signed out" }, 401);
  }
  const type = response.headers.get("content-type") || "";
  const doc = type.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiError((doc && doc.error) || {}, response.status);
  return doc;
}

// An error as a sentence, with its hint.
export function errorBox(err) {
  const code = err.code || "ERROR";
  return h("div", { class: "error-box", role: "alert" },
    h("strong", {}, code), " ", err.message || String(err),
    err.hint ? h("div", { class: "hint" }, err.hint) : null);
}

// A short message at the bottom of the screen (errors of buttons, confirmations).
export function toast(message, kind = "info") {
  let area = document.getElementById("toasts");
  if (!area) {
    area = h("div", { id: "toasts", class: "toasts", role: "status", "aria-live": "polite" });
    document.body.append(area);
  }
  const el = h("div", { class: `toast ${kind}` }, message);
  area.append(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
}

export async function act(button, fn, done) {
  button.disabled = true;
  try {
    const out = await fn();
    if (done) toast(done);
    return out;
  } catch (err) {
    toast(`${err.code || "ERROR"}: ${err.message}${err.hint ? " — " + err.hint : ""}`, "error");
    return null;
  } finally {
    button.disabled = false;
  }
}

// The pool, live: one EventSource for the whole page; pages subscribe to its documents.
const pool = { doc: null, at: 0, listeners: new Set(), sampleListeners: new Set(), source: null,
  watchingVisibility: false };

export function onPool(fn) {
  pool.listeners.add(fn);
  if (pool.doc) fn(pool.doc);
  return () => pool.listeners.delete(fn);
}

export function onSample(fn) {
  pool.sampleListeners.add(fn);
  return () => pool.sampleListeners.delete(fn);
}

export function poolDoc() {
  return pool.doc;
}

// Seconds since the pool document arrived (to age the figures it carries).
export function sinceDoc() {
  return pool.at ? (performance.now() - pool.at) / 1000 : 0;
}

export function connectPool(onState) {
  if (!pool.watchingVisibility) {
    // a browser opens at most six connections to one server: a hidden tab gives its
    // stream back, and takes a new one when it is shown again
    pool.watchingVisibility = true;
    document.addEventListener("visibilitychange", () => {
      if (document.hidden && pool.source) {
        pool.source.close();
        pool.source = null;
        onState("paused");
      } else if (!document.hidden && !pool.source) {
        connectPool(onState);
      }
    });
  }
  const source = new EventSource("/v2/pool/events");
  pool.source = source;
  source.addEventListener("open", () => onState("live"));
  source.addEventListener("pool", (event) => {
    pool.doc = JSON.parse(event.data);
    pool.at = performance.now();
    onState("live");
    for (const fn of pool.listeners) fn(pool.doc);
  });
  source.addEventListener("sample", (event) => {
    const sample = JSON.parse(event.data);
    for (const fn of pool.sampleListeners) fn(sample);
  });
  source.addEventListener("error", async () => {
    onState("reconnecting");
    if (source.readyState === EventSource.CLOSED && pool.source === source) {
      pool.source = null;
      // refused (signed out?) or the queen is gone: ask once, then try again
      try {
        await api("/v2/pool");
      } catch {
        /* api() already went to the sign-in page on 401 */
      }
      setTimeout(() => { if (!pool.source && !document.hidden) connectPool(onState); }, 2000);
    }
  });
}

// Formats

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  let value = Number(n);
  for (const unit of UNITS) {
    if (Math.abs(value) < 1024 || unit === "TiB") {
      return unit === "B" ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, seconds);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

export function ago(epochSeconds) {
  if (!epochSeconds) return "—";
  return `${duration(Date.now() / 1000 - epochSeconds)} ago`;
}

export function clock(epochSeconds) {
  if (!epochSeconds) return "—";
  return new Date(epochSeconds * 1000).toLocaleString();
}

export function num(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "—";
  return Number(value).toFixed(digits);
}

export function ms(value) {
  if (value === null || value === undefined) return "—";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Number(value).toFixed(0)} ms`;
}

export function pill(state) {
  return h("span", { class: `pill state-${state}` }, state);
}

export const FINAL = new Set(["done", "failed", "cancelled"]);
