// dealrec console: plain JavaScript, no dependencies, nothing fetched from elsewhere.
// Talks to the /v1 API of the server that serves it, with the key the user typed (sessionStorage).
// Every piece of API data reaches the page through textContent or SVG attributes, never as HTML.
// The entry point, loaded as a native ES module (no build step; strict mode, as every module): it
// routes the hash to the views of its sibling modules, one job each; dom.js, format.js, api.js and
// view.js are what they share.

import {apiKey} from "./api.js";
import {datasetsView} from "./datasets.js";
import {$, clear, h} from "./dom.js";
import {newJobView} from "./job-form.js";
import {jobView, jobsView} from "./jobs.js";
import {keyForm, renderKeybar} from "./key.js";
import {nextView, showError, viewToken} from "./view.js";

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  return {parts: path.split("/").filter(Boolean), query: new URLSearchParams(query || "")};
}

async function route(ev) {
  const token = nextView();
  showError(null);
  renderKeybar(route);
  const main = $("#main");
  clear(main);
  if (!apiKey()) {  // nothing is requested, nothing rendered, without a key
    main.append(keyForm(route));
    $("#api-key").focus();
    return;
  }
  const {parts, query} = parseHash();
  const name = parts[0] || "datasets";
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.route === (name === "jobs" && parts[1] ? "" : name)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    if (name === "datasets") await datasetsView(main, token);
    else if (name === "new") await newJobView(main, token, query);
    else if (name === "jobs" && parts[1]) await jobView(main, token, decodeURIComponent(parts[1]));
    else if (name === "jobs") await jobsView(main, token, query);
    else main.append(h("h1", {text: "Not found"}), h("p", {}, h("a", {href: "#/datasets"}, "Back to the datasets")));
  } catch (e) {
    if (token === viewToken) showError(e);
  }
  const title = $("h1", main);
  if (title && token === viewToken) {
    title.setAttribute("tabindex", "-1");
    // After a navigation, the keyboard (and a screen reader) starts at the new page's heading.
    if (ev && ev.type === "hashchange" && !main.contains(document.activeElement)) title.focus({preventScroll: true});
  }
}

// ------------------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", route);
