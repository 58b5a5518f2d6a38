// The queen's web UI: one page with hash routes (#/pool, #/models, #/jobs, #/jobs/ID,
// #/playground), plain DOM, no framework and no build step.

import { connectPool, h } from "./lib.js";
import { jobPage, jobsPage } from "./jobs.js";
import { modelsPage } from "./models.js";
import { playgroundPage } from "./playground.js";
import { poolPage } from "./pool.js";

const ROUTES = [
  [/^#\/pool$/, poolPage, "pool"],
  [/^#\/models$/, modelsPage, "models"],
  [/^#\/jobs(?:\?(.*))?$/, jobsPage, "jobs"],
  [/^#\/jobs\/([\w.-]+)$/, jobPage, "jobs"],
  [/^#\/playground$/, playgroundPage, "playground"],
];

let current = null; // {page, root, cleanup}
const kept = new Map(); // pages that live on while another is shown (the playground)

function route() {
  const hash = location.hash || "#/pool";
  const match = ROUTES.find(([re]) => re.test(hash));
  if (!match) {
    if (!hash.startsWith("#/")) return; // an in-page anchor
    location.replace("#/pool");
    return;
  }
  const [re, page, nav] = match;
  const args = hash.match(re).slice(1);
  const main = document.getElementById("main");
  if (current) {
    if (current.page.keep) {
      current.root.remove();
    } else if (current.cleanup) {
      current.cleanup();
    }
  }
  main.replaceChildren();
  let root = page.keep ? kept.get(page) : null;
  let cleanup = null;
  if (root) {
    main.append(root);
  } else {
    root = h("div", { class: "page" });
    main.append(root);
    cleanup = page.mount(root, ...args);
    if (page.keep) kept.set(page, root);
  }
  current = { page, root, cleanup };
  document.title = `${page.title} · rbee`;
  for (const a of document.querySelectorAll("nav a[data-page]")) {
    if (a.dataset.page === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const heading = root.querySelector("h1");
  if (heading && document.activeElement !== document.body) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
}

function showLive(state) {
  const el = document.getElementById("live");
  el.dataset.state = state;
  el.textContent = { live: "live", paused: "paused" }[state] || "reconnecting…";
}

document.getElementById("skip").addEventListener("click", (event) => {
  event.preventDefault();
  document.getElementById("main").focus();
});
window.addEventListener("hashchange", route);
connectPool(showLive);
route();
