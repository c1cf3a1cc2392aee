// The current view's lifetime, shared by every view: a token bumped on each route (stale async work
// checks it and stops, so a slow answer never draws on the next page), the one polling timer, and the
// error banner. viewToken is exported as a live binding: importers always read the current value, and
// only this module changes it.

import {ApiError} from "./api.js";
import {$, clear} from "./dom.js";

let poller = null;      // the current view's timer
export let viewToken = 0;  // bumped on every route: stale async work checks it and stops

// A new view: the old one's timer stopped, its token outdated.
export function nextView() {
  stopPolling();
  return ++viewToken;
}

export function stopPolling() {
  if (poller) clearTimeout(poller);
  poller = null;
}

// The view's next refresh; the next route stops it.
export function poll(fn, ms) { poller = setTimeout(fn, ms); }

export function showError(e) {
  const banner = $("#error");
  if (!e) { banner.hidden = true; clear(banner); return; }
  const msg = e instanceof ApiError ? e.message : `Unexpected error: ${e && e.message ? e.message : e}`;
  banner.textContent = msg;
  banner.hidden = false;
  if (e instanceof ApiError && e.status === 401 && e.code !== "no_key") {
    banner.textContent = `${msg} — enter a valid API key.`;
  }
}
