// The /v1 API client and the key it sends. The key lives only in this tab's session storage (never a
// cookie): it is sent as a Bearer header by api() alone, and goes when the tab closes.
// No DOM here: the views decide how an ApiError is shown.

const KEY_STORE = "dealrec.apiKey";

export class ApiError extends Error {
  constructor(status, code, message, detail) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail || {};
  }
}

export function apiKey() { return sessionStorage.getItem(KEY_STORE); }
export function storeApiKey(key) { sessionStorage.setItem(KEY_STORE, key); }
export function forgetApiKey() { sessionStorage.removeItem(KEY_STORE); }

export async function api(path, {method = "GET", json, form, as = "json", headers = {}} = {}) {
  const key = apiKey();
  if (!key) throw new ApiError(401, "no_key", "Enter an API key first.");
  const opts = {method, headers: {Authorization: `Bearer ${key}`, ...headers}};
  if (json !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(json);
  } else if (form) {
    opts.body = form;
  }
  let r;
  try {
    r = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(0, "network", `The service cannot be reached (${e.message}).`);
  }
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    const err = (body && body.error) || {};
    throw new ApiError(r.status, err.code || `http_${r.status}`, err.message || `HTTP ${r.status} ${r.statusText}`, err);
  }
  if (r.status === 204) return null;
  if (as === "text") return r.text();
  if (as === "blob") return r.blob();
  return r.json();
}

let schemaCache = null;
export async function openapi() {
  if (!schemaCache) {
    const r = await fetch("/openapi.json");
    if (!r.ok) throw new ApiError(r.status, "openapi", `Cannot read the API schema (HTTP ${r.status}).`);
    schemaCache = await r.json();
  }
  return schemaCache;
}

// A paged list followed by its cursors, 200 items a request, until it ends or holds `limit` items.
export async function listAll(path, limit = 400) {
  const items = [];
  let cursor = null;
  do {
    const page = await api(`${path}${path.includes("?") ? "&" : "?"}limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < limit);
  return items;
}

export function randomKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);  // works outside secure contexts too, unlike randomUUID
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
