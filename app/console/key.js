// The API key: its form (all a visitor without a key sees; nothing is requested before it) and the
// header's key bar. Both take the router as `route` and call it once the key changed, rather than
// importing it: app.js imports this module, and the graph stays free of cycles.

import {api, apiKey, forgetApiKey, storeApiKey} from "./api.js";
import {$, clear, h} from "./dom.js";

export function renderKeybar(route) {
  const bar = $("#keybar");
  clear(bar);
  const nav = $("#nav");
  if (apiKey()) {
    nav.hidden = false;
    bar.append(h("span", {class: "muted", text: "API key set for this tab"}),
      h("button", {type: "button", class: "secondary", id: "forget-key", onclick: () => {
        forgetApiKey();
        route();
      }}, "Forget key"));
  } else {
    nav.hidden = true;
  }
}

export function keyForm(route) {
  const input = h("input", {type: "password", id: "api-key", autocomplete: "off", required: true,
    "aria-describedby": "key-help", placeholder: "your API key"});
  const status = h("p", {class: "error-text", id: "key-status", role: "alert"});
  const form = h("form", {class: "card", id: "key-form", onsubmit: async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    storeApiKey(key);
    try {
      await api("/v1/datasets?limit=1");
    } catch (e) {
      forgetApiKey();
      status.textContent = e.message;
      input.focus();
      return;
    }
    if (!location.hash || location.hash === "#") location.hash = "#/datasets";
    route();
  }},
  h("h1", {text: "Sign in with an API key"}),
  h("div", {class: "field"}, h("label", {for: "api-key", text: "API key"}), input,
    h("span", {class: "help", id: "key-help",
      text: "Sent as 'Authorization: Bearer <key>' with every request; kept only in this tab's session storage."})),
  h("div", {class: "actions"}, h("button", {type: "submit", id: "key-submit"}, "Use this key")),
  status);
  return form;
}
