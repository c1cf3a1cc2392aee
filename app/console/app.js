// dealrec console: plain JavaScript, no dependencies, nothing fetched from elsewhere.
// Talks to the /v1 API of the server that serves it, with the key the user typed (sessionStorage).
// Every piece of API data reaches the page through textContent or SVG attributes, never as HTML.
// Loaded as a native ES module (no build step; strict mode, as every module): the shared layer is in
// its sibling modules (dom.js, format.js, api.js, view.js, key.js).

import {api, apiKey, listAll, openapi, randomKey} from "./api.js";
import {$, clear, h, s} from "./dom.js";
import {badge, errorList, fmtNum, fmtSeconds, fmtTime, where} from "./format.js";
import {keyForm, renderKeybar} from "./key.js";
import {nextView, poll, showError, viewToken} from "./view.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const POLL_MS = 1000;
// Charts are drawn in a narrower coordinate space on a phone, so that their labels stay legible.
const chartWidth = () => (window.innerWidth < 600 ? 400 : 640);

// ------------------------------------------------------------------------------------------------
// Routing

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
// Datasets

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  for (const [k, label] of [["users", "users"], ["items", "items"], ["train_interactions", "train interactions"],
    ["mean_train_length", "mean length"], ["users_with_test", "with a test item"]]) {
    if (stats[k] !== undefined) parts.push(`${fmtNum(stats[k])} ${label}`);
  }
  return parts.join(" · ");
}

async function datasetsView(main, token) {
  main.append(h("h1", {text: "Datasets"}), uploadCard(token));
  const listBox = h("section", {id: "datasets-list", "aria-labelledby": "datasets-list-title"},
    h("h2", {id: "datasets-list-title", text: "Your datasets"}));
  main.append(listBox);
  await renderDatasetList(listBox, token);
}
async function renderDatasetList(box, token) {
  const items = await listAll("/v1/datasets");
  if (token !== viewToken) return;
  const old = $("#datasets-table-wrap", box);
  if (old) old.remove();
  const wrap = h("div", {class: "table-wrap", id: "datasets-table-wrap"});
  if (!items.length) {
    wrap.append(h("p", {class: "note", text: "No dataset yet: upload one above."}));
    box.append(wrap);
    return;
  }
  const rows = items.map((d) => h("tr", {"data-id": d.id},
    h("td", {}, h("strong", {text: d.name || "(unnamed)"}), h("br"), h("code", {text: d.id}),
      d.parent_id ? h("div", {class: "help", text: `version of ${d.parent_id}`}) : null),
    h("td", {}, badge(d.status), d.status === "invalid" ? errorList(d.errors || []) : null),
    h("td", {class: "hide-narrow", text: d.format || ""}),
    h("td", {text: statsText(d.statistics)}),
    h("td", {class: "hide-narrow", text: fmtTime(d.created_at)}),
    h("td", {}, h("div", {class: "row"},
      d.status === "ready" ? h("a", {href: `#/new?dataset=${encodeURIComponent(d.id)}`, class: "button"}, "New job") : null,
      h("button", {type: "button", class: "danger", "aria-label": `Delete dataset ${d.name || d.id}`, onclick: async () => {
        if (!confirm(`Delete dataset ${d.name || d.id}? Its files are removed.`)) return;
        try {
          await api(`/v1/datasets/${encodeURIComponent(d.id)}`, {method: "DELETE"});
          await renderDatasetList(box, viewToken);
        } catch (e) { showError(e); }
      }}, "Delete")))));
  wrap.append(h("table", {id: "datasets-table"},
    h("thead", {}, h("tr", {}, h("th", {text: "Dataset"}), h("th", {text: "Status"}),
      h("th", {class: "hide-narrow", text: "Format"}), h("th", {text: "Statistics"}),
      h("th", {class: "hide-narrow", text: "Uploaded"}), h("th", {text: "Actions"}))),
    h("tbody", {}, rows)));
  box.append(wrap);
}

function uploadCard(token) {
  let dropped = null;  // files dropped on the zone (they win over the input's)
  const input = h("input", {type: "file", id: "upload-files", multiple: true,
    "aria-describedby": "upload-help", onchange: () => { dropped = null; listFiles(); }});
  const name = h("input", {type: "text", id: "upload-name", maxlength: 200, placeholder: "e.g. games-2026-11"});
  const fileList = h("ul", {class: "file-list", id: "upload-file-list"});
  const status = h("div", {id: "upload-status", "aria-live": "polite"});
  const files = () => (dropped || Array.from(input.files || []));
  function listFiles() {
    clear(fileList);
    for (const f of files()) fileList.append(h("li", {text: `${f.name} (${fmtNum(f.size)} bytes)`}));
  }
  const zone = h("div", {class: "drop", id: "drop-zone", tabindex: 0, role: "button",
    "aria-label": "Drop the dataset's files or one archive here, or press Enter to choose files",
    onclick: () => input.click(),
    onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); } },
    ondragover: (ev) => { ev.preventDefault(); zone.classList.add("over"); },
    ondragleave: () => zone.classList.remove("over"),
    ondrop: (ev) => {
      ev.preventDefault();
      zone.classList.remove("over");
      dropped = Array.from(ev.dataTransfer.files || []);
      listFiles();
    }}, "Drop the files (or one .zip / .tar.gz) here, or press Enter to choose them");
  const button = h("button", {type: "submit", id: "upload-submit"}, "Upload");
  const form = h("form", {class: "card", id: "upload-form", onsubmit: async (ev) => {
    ev.preventDefault();
    showError(null);
    clear(status);
    const chosen = files();
    if (!chosen.length) {
      status.append(h("p", {class: "error-text", role: "alert", text: "Choose the dataset's files first."}));
      return;
    }
    const fd = new FormData();
    for (const f of chosen) fd.append("files", f, f.name);
    const q = name.value.trim() ? `?name=${encodeURIComponent(name.value.trim())}` : "";
    button.disabled = true;
    status.append(h("p", {text: `Uploading ${chosen.length} file(s)…`}));
    try {
      let d = await api(`/v1/datasets${q}`, {method: "POST", form: fd});
      clear(status);
      status.append(h("p", {}, "Uploaded as ", h("code", {text: d.id}), "; validating…"));
      while (d.status === "validating") {
        await new Promise((r) => setTimeout(r, 700));
        if (token !== viewToken) return;
        d = await api(`/v1/datasets/${encodeURIComponent(d.id)}`);
      }
      clear(status);
      if (d.status === "ready") {
        status.append(h("p", {class: "ok", id: "upload-result"}, badge("ready"), " ", h("code", {text: d.id}), " ",
          statsText(d.statistics), " ", h("a", {href: `#/new?dataset=${encodeURIComponent(d.id)}`}, "Start a job")));
      } else {
        status.append(h("div", {id: "upload-result", role: "alert"}, h("p", {}, badge(d.status), " ",
          h("code", {text: d.id}), " — the worker's validation found:"), errorList(d.errors || [])));
      }
      const box = $("#datasets-list");
      if (box) await renderDatasetList(box, token);
    } catch (e) {
      clear(status);
      const detail = e.detail || {};
      status.append(h("div", {id: "upload-result", role: "alert"},
        h("p", {class: "error-text", text: `Upload refused: ${e.message}`}),
        detail.file || detail.line || detail.field ? errorList([{...detail, message: detail.message || e.message}]) : null));
      showError(e);
    } finally {
      button.disabled = false;
      input.value = "";  // the next upload starts from a fresh choice
      dropped = null;
      listFiles();
    }
  }},
  h("h2", {text: "Upload a dataset"}),
  h("p", {class: "help", id: "upload-help",
    text: "DEALRec layout (sequential_train.txt, …, items.tsv), an interaction log with an items table, RecBole atomic " +
      "files, or one archive holding them. The files are checked at once; a worker then validates every row."}),
  h("div", {class: "form-grid"},
    h("div", {class: "field"}, h("label", {for: "upload-files", text: "Files"}), input),
    h("div", {class: "field"}, h("label", {for: "upload-name", text: "Name (optional)"}), name)),
  zone, fileList, h("div", {class: "actions"}, button), status);
  return form;
}
// ------------------------------------------------------------------------------------------------
// New job: the form is built from the OpenAPI schema of PruneRequest (defaults, ranges, choices).

function deref(schema, spec) {
  let x = schema;
  for (let i = 0; i < 10 && x && x.$ref; i++) {
    const name = x.$ref.split("/").pop();
    x = {...spec.components.schemas[name], ...Object.fromEntries(Object.entries(x).filter(([k]) => k !== "$ref"))};
  }
  return x || {};
}

// The schema of a field without its `null` option, and whether null is allowed.
function unwrap(schema, spec) {
  let x = deref(schema, spec);
  let nullable = false;
  const alts = x.anyOf || x.oneOf;
  if (alts) {
    const rest = alts.filter((a) => a.type !== "null");
    nullable = rest.length < alts.length;
    if (rest.length === 1) {
      const {anyOf, oneOf, ...outer} = x;
      x = {...deref(rest[0], spec), ...outer};
    } else {
      x = {...x, anyOf: rest};
    }
  }
  return {schema: x, nullable};
}

// "(0.3)" at the end of a description: the default a nullable field takes when omitted.
function describedDefault(desc) {
  const m = /\(([^()]*)\)\s*$/.exec(desc || "");
  return m ? m[1] : null;
}

const fields = [];  // {path, kind, def, input, nullable}

function fieldId(path) { return `f-${path.join("__")}`; }

function buildField(name, raw, path, spec) {
  const {schema, nullable} = unwrap(raw, spec);
  const id = fieldId(path);
  const label = schema.title && schema.title.toLowerCase() !== name.replace(/_/g, " ") ? schema.title : name;
  const desc = schema.description || "";
  const def = schema.default;
  const helpBits = [desc];
  if (def !== undefined && def !== null && typeof def !== "object") helpBits.push(`default: ${def}`);
  else if (nullable && describedDefault(desc) === null && def === null) helpBits.push("default: the service's");
  const help = h("span", {class: "help", id: `${id}-help`, text: helpBits.filter(Boolean).join(" · ")});
  const choices = schema.enum || (schema.const !== undefined ? [schema.const] : null);
  let input, kind;
  if (choices) {
    kind = "enum";
    input = h("select", {id, "aria-describedby": `${id}-help`});
    if (nullable || def === undefined) input.append(h("option", {value: "", text: nullable ? `default${describedDefault(desc) ? ` (${describedDefault(desc)})` : ""}` : ""}));
    for (const c of choices) input.append(h("option", {value: String(c), text: String(c)}));
    input.value = def === null || def === undefined ? "" : String(def);
  } else if (schema.type === "boolean") {
    kind = "bool";
    input = h("input", {type: "checkbox", id, "aria-describedby": `${id}-help`});
    input.checked = !!def;
    fields.push({path, kind, def: !!def, input, nullable});
    return h("div", {class: "field check"}, input, h("label", {for: id, text: label}), help);
  } else if (schema.type === "integer" || schema.type === "number") {
    kind = schema.type;
    const lo = schema.minimum ?? schema.exclusiveMinimum, hi = schema.maximum ?? schema.exclusiveMaximum;
    input = h("input", {type: "number", id, "aria-describedby": `${id}-help`, step: kind === "integer" ? 1 : "any",
      min: lo, max: hi, inputmode: kind === "integer" ? "numeric" : "decimal",
      placeholder: def === null || def === undefined ? (describedDefault(desc) || "default") : undefined});
    if (def !== null && def !== undefined) input.value = String(def);
  } else {
    kind = "string";
    input = h("input", {type: "text", id, "aria-describedby": `${id}-help`, maxlength: schema.maxLength,
      placeholder: def === null || def === undefined ? "default" : undefined});
    if (def !== null && def !== undefined) input.value = String(def);
  }
  fields.push({path, kind, def: def === undefined ? null : def, input, nullable});
  return h("div", {class: "field"}, h("label", {for: id, text: label}), input, help);
}

// An object's properties as fields; nested objects as collapsible fieldsets.
function buildObject(schema, path, spec, skip = new Set()) {
  const simple = [], nested = [];
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    if (skip.has(name)) continue;
    const {schema: sub} = unwrap(raw, spec);
    if (sub.type === "object" || sub.properties) nested.push([name, raw, sub]);
    else simple.push(buildField(name, raw, [...path, name], spec));
  }
  const out = [h("div", {class: "form-grid"}, simple)];
  for (const [name, raw, sub] of nested) {
    if (name === "evaluate") continue;  // the fine-tuning block adds it with its own switch
    out.push(h("details", {}, h("summary", {text: `${name} settings`}),
      sub.description ? h("p", {class: "help", text: sub.description}) : null,
      buildObject(sub, [...path, name], spec)));
  }
  return out;
}

function fieldValue(f) {
  const v = f.input.value;
  if (f.kind === "bool") return f.input.checked;
  if (v === "") return undefined;
  if (f.kind === "integer") return Number.parseInt(v, 10);
  if (f.kind === "number") return Number.parseFloat(v);
  if (f.kind === "enum" && typeof f.def === "number") return Number(v);
  return v;
}

function setPath(obj, path, value) {
  let o = obj;
  for (const k of path.slice(0, -1)) o = (o[k] = o[k] || {});
  o[path[path.length - 1]] = value;
}

async function newJobView(main, token, query) {
  const [spec, datasets] = await Promise.all([openapi(), listAll("/v1/datasets")]);
  if (token !== viewToken) return;
  fields.length = 0;
  const req = deref({$ref: "#/components/schemas/PruneRequest"}, spec);
  const props = req.properties;
  const ready = datasets.filter((d) => d.status === "ready");
  const dsSelect = h("select", {id: "f-dataset_id", required: true},
    ready.map((d) => h("option", {value: d.id, text: `${d.name || "(unnamed)"} — ${d.id} (${fmtNum((d.statistics || {}).users)} users)`})));
  if (query.get("dataset")) dsSelect.value = query.get("dataset");

  // Budget: a count or a ratio, as the schema says (StrictInt | StrictFloat).
  const budgetSchema = unwrap(props.budget, spec).schema;
  const budgetDefault = budgetSchema.default ?? 1024;
  const budgetInput = h("input", {type: "number", id: "f-budget", min: 1, step: 1, value: budgetDefault,
    required: true, "aria-describedby": "f-budget-help"});
  const modeCount = h("input", {type: "radio", name: "budget-mode", id: "budget-count", value: "count", checked: true});
  const modeRatio = h("input", {type: "radio", name: "budget-mode", id: "budget-ratio", value: "ratio"});
  const setMode = () => {
    if (modeRatio.checked) {
      Object.assign(budgetInput, {min: 0.0001, max: 0.9999, step: "any"});
      if (Number(budgetInput.value) >= 1) budgetInput.value = "0.02";
    } else {
      budgetInput.removeAttribute("max");
      Object.assign(budgetInput, {min: 1, step: 1});
      if (Number(budgetInput.value) < 1) budgetInput.value = String(budgetDefault);
    }
  };
  modeCount.addEventListener("change", setMode);
  modeRatio.addEventListener("change", setMode);
  const budgetField = h("fieldset", {},
    h("legend", {text: "Budget"}),
    h("div", {class: "row", role: "radiogroup"},
      modeCount, h("label", {for: "budget-count", text: "count of samples"}),
      modeRatio, h("label", {for: "budget-ratio", text: "ratio of the samples"})),
    h("div", {class: "field"}, h("label", {for: "f-budget", text: "budget"}), budgetInput,
      h("span", {class: "help", id: "f-budget-help", text: `${budgetSchema.description || ""} · default: ${budgetDefault}`})));

  const topSkip = new Set(["dataset_id", "budget", "params", "finetune"]);
  const paramsSchema = unwrap(props.params, spec).schema;
  const ftSchema = unwrap(props.finetune, spec).schema;
  const evalProp = ftSchema.properties && ftSchema.properties.evaluate;
  const evalSchema = evalProp ? unwrap(evalProp, spec).schema : null;
  const ftOn = h("input", {type: "checkbox", id: "finetune-on"});
  const evalOn = h("input", {type: "checkbox", id: "evaluate-on", checked: true});
  const ftBody = h("div", {id: "finetune-fields", hidden: true},
    h("p", {class: "help", text: ftSchema.description || ""}),
    buildObject(ftSchema, ["finetune"], spec),
    evalSchema ? h("fieldset", {},
      h("legend", {}, h("span", {class: "row"}, evalOn, h("label", {for: "evaluate-on", text: "evaluate after fine-tuning"}))),
      h("p", {class: "help", text: evalSchema.description || ""}),
      h("div", {id: "evaluate-fields"}, buildObject(evalSchema, ["finetune", "evaluate"], spec))) : null);
  ftOn.addEventListener("change", () => { ftBody.hidden = !ftOn.checked; });
  evalOn.addEventListener("change", () => { $("#evaluate-fields").hidden = !evalOn.checked; });

  const status = h("div", {id: "job-form-status", "aria-live": "polite"});
  const submit = h("button", {type: "submit", id: "job-submit"}, "Start the job");
  const form = h("form", {class: "card", id: "job-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    showError(null);
    clear(status);
    for (const f of fields) f.input.removeAttribute("aria-invalid");
    const body = {dataset_id: dsSelect.value};
    const b = Number(budgetInput.value);
    body.budget = modeRatio.checked ? b : Math.round(b);  // a ratio outside (0, 1): the API says why
    for (const f of fields) {
      const top = f.path[0];
      if (top === "finetune" && !ftOn.checked) continue;
      if (f.path[1] === "evaluate" && top === "finetune" && !evalOn.checked) continue;
      const v = fieldValue(f);
      if (v === undefined || Number.isNaN(v)) continue;
      if (f.def !== null && JSON.stringify(v) === JSON.stringify(f.def)) continue;  // the default: leave it out
      setPath(body, f.path, v);
    }
    if (ftOn.checked) {
      body.finetune = body.finetune || {};
      if (!evalOn.checked) body.finetune.evaluate = null;
    }
    submit.disabled = true;
    try {
      const job = await api("/v1/prune", {method: "POST", json: body, headers: {"Idempotency-Key": randomKey()}});
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      showError(e);
      status.append(h("p", {class: "error-text", role: "alert", id: "job-form-error", text: e.message}));
      const field = e.detail && e.detail.field;
      const target = field && document.getElementById(fieldId(field.split(".")));
      if (target) { target.setAttribute("aria-invalid", "true"); target.focus(); }
    } finally {
      submit.disabled = false;
    }
  }},
  h("h1", {text: "New pruning job"}),
  ready.length ? null : h("p", {class: "note"}, "No dataset is ready yet: ", h("a", {href: "#/datasets"}, "upload one"), " first."),
  h("p", {class: "help", text: "Every parameter and its default comes from the API's schema; a field left at its default is not sent."}),
  h("div", {class: "form-grid"},
    h("div", {class: "field"}, h("label", {for: "f-dataset_id", text: "dataset"}), dsSelect)),
  budgetField,
  buildObject(req, [], spec, topSkip),
  h("fieldset", {}, h("legend", {text: "Selection and scores (params)"}), buildObject(paramsSchema, ["params"], spec)),
  h("fieldset", {}, h("legend", {}, h("span", {class: "row"}, ftOn, h("label", {for: "finetune-on", text: "fine-tune the LLM on the selection"}))),
    ftBody),
  h("div", {class: "actions"}, submit), status);
  main.append(form);
}
// ------------------------------------------------------------------------------------------------
// Jobs list

const cursorStack = [];

async function jobsView(main, token, query) {
  const status = query.get("status") || "";
  const cursor = query.get("cursor") || "";
  const limit = 20;
  const filter = h("select", {id: "jobs-status", onchange: () => {
    cursorStack.length = 0;
    location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs";
  }}, h("option", {value: "", text: "all"}), JOB_STATUSES.map((x) => h("option", {value: x, text: x})));
  filter.value = status;
  const box = h("div", {id: "jobs-box"});
  main.append(h("h1", {text: "Jobs"}),
    h("div", {class: "row"}, h("label", {for: "jobs-status", text: "Status"}), filter,
      h("a", {href: "#/new", class: "button"}, "New job")), box);
  const load = async () => {
    const q = new URLSearchParams({limit: String(limit)});
    if (status) q.set("status", status);
    if (cursor) q.set("cursor", cursor);
    const page = await api(`/v1/jobs?${q}`);
    if (token !== viewToken) return;
    clear(box);
    if (!page.items.length) box.append(h("p", {class: "note", text: "No job here."}));
    else box.append(h("div", {class: "table-wrap"}, h("table", {id: "jobs-table"},
      h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Budget", "Progress", "Dataset", "Created"].map((t, i) =>
        h("th", {class: i >= 5 ? "hide-narrow" : null, text: t})))),
      h("tbody", {}, page.items.map((j) => h("tr", {},
        h("td", {}, h("a", {href: `#/jobs/${encodeURIComponent(j.id)}`}, h("code", {text: j.id}))),
        h("td", {}, badge(j.status)),
        h("td", {text: j.request.method || "dealrec"}),
        h("td", {class: "num", text: j.request.budget ?? ""}),
        h("td", {text: j.status === "running" ? `${j.stage || ""} ${Math.round(100 * j.progress)}%` : (j.status === "succeeded" ? "100%" : "")}),
        h("td", {class: "hide-narrow"}, h("code", {text: j.dataset_id})),
        h("td", {class: "hide-narrow", text: fmtTime(j.created_at)})))))));
    const pager = h("div", {class: "pager"});
    const base = status ? `status=${status}&` : "";
    if (cursor) pager.append(h("button", {type: "button", class: "secondary", id: "jobs-prev", onclick: () => {
      const prev = cursorStack.pop();
      location.hash = prev ? `#/jobs?${base}cursor=${encodeURIComponent(prev)}` : `#/jobs${status ? `?status=${status}` : ""}`;
    }}, "Newer"));
    if (page.next_cursor) pager.append(h("button", {type: "button", class: "secondary", id: "jobs-next", onclick: () => {
      if (cursor) cursorStack.push(cursor);
      location.hash = `#/jobs?${base}cursor=${encodeURIComponent(page.next_cursor)}`;
    }}, "Older"));
    box.append(pager);
    if (page.items.some((j) => !TERMINAL.has(j.status))) poll(() => load().catch(showError), 2000);
  };
  await load();
}

// ------------------------------------------------------------------------------------------------
// One job: live status, events, downloads, and the selection report

async function jobView(main, token, jobId) {
  const head = h("div", {id: "job-head"});
  const events = h("ol", {class: "events", id: "job-events", "aria-label": "Job events"});
  const report = h("section", {id: "report", "aria-labelledby": "report-title"});
  main.append(h("h1", {}, "Job ", h("code", {text: jobId})), head,
    h("h2", {text: "Events"}), events, report);
  let after = 0;
  let reported = false;
  const tick = async () => {
    const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
    if (token !== viewToken) return;
    renderJobHead(head, job);
    const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events?after=${after}&limit=1000`);
    if (token !== viewToken) return;
    for (const e of page.items) {
      events.append(h("li", {class: e.level},
        h("time", {datetime: e.created_at, text: new Date(e.created_at).toLocaleTimeString()}), e.message,
        e.data && Object.keys(e.data).length ? h("span", {class: "muted", text: ` ${JSON.stringify(e.data)}`}) : null));
    }
    if (page.items.length) events.scrollTop = events.scrollHeight;
    after = page.next_after;
    if (TERMINAL.has(job.status) && !page.has_more) {
      if (!reported) {
        reported = true;
        if (job.status === "succeeded") await renderReport(report, job, token);
      }
      return;
    }
    poll(() => tick().catch((e) => { if (token === viewToken) { showError(e); poll(() => tick().catch(showError), 3000); } }), POLL_MS);
  };
  await tick();
}

function renderJobHead(box, job) {
  clear(box);
  const req = job.request || {};
  const params = job.params || {};
  const sel = params.selection || {};
  let eta = "";
  if (job.estimated_finish) {
    const left = (new Date(job.estimated_finish) - Date.now()) / 1000;
    eta = `ETA ${new Date(job.estimated_finish).toLocaleTimeString()} (in ${fmtSeconds(Math.max(0, left))})`;
  }
  const pct = Math.round(100 * (job.progress || 0));
  box.append(h("div", {class: "card"},
    h("div", {class: "progress-row"}, h("span", {id: "job-status"}, badge(job.status)),
      h("progress", {id: "job-progress", max: 1, value: job.progress || 0, "aria-label": `progress ${pct}%`}),
      h("span", {id: "job-progress-text", text: `${pct}%${job.stage ? ` · ${job.stage}` : ""}${eta ? ` · ${eta}` : ""}`}),
      TERMINAL.has(job.status) ? null : h("button", {type: "button", class: "danger", id: "job-cancel",
        disabled: job.cancel_requested, onclick: async (ev) => {
          ev.target.disabled = true;
          try { renderJobHead(box, await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, {method: "POST"})); } catch (e) { showError(e); }
        }}, job.cancel_requested ? "Cancelling…" : "Cancel")),
    job.error ? h("p", {class: "error-text", role: "alert", id: "job-error"}, h("strong", {text: `${job.error.code}: `}), job.error.message,
      where(job.error) ? ` (${where(job.error)})` : "") : null,
    h("dl", {class: "kv"},
      h("dt", {text: "dataset"}), h("dd", {}, h("code", {text: job.dataset_id})),
      h("dt", {text: "method"}), h("dd", {text: sel.method || req.method || "dealrec"}),
      h("dt", {text: "budget"}), h("dd", {text: `${req.budget ?? ""}${sel.budget && sel.budget !== req.budget ? ` (${sel.budget} samples)` : ""}`}),
      h("dt", {text: "seed"}), h("dd", {text: params.seed ?? req.seed ?? 0}),
      h("dt", {text: "queue"}), h("dd", {text: job.queue}),
      h("dt", {text: "created"}), h("dd", {text: fmtTime(job.created_at)}),
      job.started_at ? [h("dt", {text: "started"}), h("dd", {text: fmtTime(job.started_at)})] : null,
      job.finished_at ? [h("dt", {text: "finished"}), h("dd", {text: fmtTime(job.finished_at)})] : null,
      job.result && job.result.n_selected !== undefined ? [h("dt", {text: "selected"}),
        h("dd", {text: `${fmtNum(job.result.n_selected)} of ${fmtNum(job.result.n_samples)} samples`})] : null),
    stagesTable(job),
    job.status === "succeeded" ? downloads(job) : null,
    h("details", {}, h("summary", {text: "All parameters"}), h("pre", {class: "mono", text: JSON.stringify(job.params || job.request, null, 1)}))));
}

function stagesTable(job) {
  const names = Object.keys(job.stages || {});
  if (job.stage && !names.includes(job.stage)) names.push(job.stage);
  if (!names.length) return h("p", {class: "note", text: "No stage has started yet."});
  return h("div", {class: "table-wrap"}, h("table", {id: "job-stages"},
    h("thead", {}, h("tr", {}, h("th", {text: "Stage"}), h("th", {class: "num", text: "Seconds"}),
      h("th", {class: "num hide-narrow", text: "Peak MB"}), h("th", {text: "Note"}))),
    h("tbody", {}, names.map((n) => {
      const t = (job.stages || {})[n];
      const running = job.status === "running" && job.stage === n;
      const note = running ? "running" : t && t.skipped ? "skipped (not needed)" : t && t.cached ? "from the cache"
        : (job.reused_stages || []).includes(n) ? "reused" : "";
      return h("tr", {class: running ? "current" : null}, h("td", {text: n}),
        h("td", {class: "num", text: t ? t.seconds.toFixed(2) : ""}),
        h("td", {class: "num hide-narrow", text: t && t.peak_rss_mb ? t.peak_rss_mb.toFixed(0) : ""}),
        h("td", {text: note}));
    }))));
}

function downloads(job) {
  const links = (job.result && job.result.links) || {};
  const items = [["selection", "selection.json"], ["selection_csv", "selection.csv"], ["scores", "scores.csv"],
    ["bigrec_train", "bigrec_train.jsonl"], ["diagnostics", "diagnostics.json"], ["adapter", "adapter.tar.gz"]];
  return h("div", {id: "downloads"}, h("h3", {text: "Downloads"}), h("div", {class: "actions"},
    items.filter(([k]) => links[k]).map(([k, file]) => h("button", {type: "button", class: "secondary",
      id: `download-${k}`, onclick: () => download(links[k], file)}, file))));
}

// Fetched with the key (a plain link could not send the Authorization header), then saved from a blob URL.
async function download(path, filename) {
  try {
    const blob = await api(path, {as: "blob"});
    const url = URL.createObjectURL(blob);
    const a = h("a", {href: url, download: filename, hidden: true});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    showError(e);
  }
}

// ------------------------------------------------------------------------------------------------
// The selection report

function parseCsv(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n") { row.push(field); rows.push(row); row = []; field = ""; }
    else if (c !== "\r") field += c;
  }
  if (field || row.length) { row.push(field); rows.push(row); }
  const [header, ...body] = rows;
  return body.map((r) => Object.fromEntries(header.map((k, i) => [k, r[i] ?? ""])));
}

const num = (x) => (x === "" || x === undefined ? null : Number(x));

async function renderReport(box, job, token) {
  const links = job.result.links || {};
  const [csv, diag] = await Promise.all([
    api(links.scores, {as: "text"}),
    links.diagnostics ? api(links.diagnostics).catch(() => null) : Promise.resolve(null),
  ]);
  if (token !== viewToken) return;
  const rows = parseCsv(csv).map((r) => ({
    index: Number(r.index), user: r.user_id, influence: num(r.influence), effort: num(r.effort), overall: num(r.overall),
    stratum: Number(r.stratum), selected: r.selected === "1", tokens: num(r.prompt_tokens)}));
  const stratified = rows.some((r) => r.stratum >= 0);
  for (const r of rows) r.pruned = stratified && r.stratum < 0;
  const method = (job.params && job.params.selection && job.params.selection.method) || job.request.method;
  box.append(h("h2", {id: "report-title", text: "Why these samples"}));
  const charts = h("div", {class: "charts"});
  box.append(charts);
  charts.append(scatterFigure(rows, method));
  charts.append(strataFigure(diag, method));
  if (diag) {
    charts.append(featuresFigure(diag));
    box.append(spearmanTable(diag));
  }
  const metrics = metricsBlock(job.result);
  if (metrics) box.append(metrics);
}

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= step0) || step0;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

function extent(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v !== null && Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; } }
  if (lo === Infinity) return [0, 1];
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.03;
  return [lo - pad, hi + pad];
}

// A deterministic spread in [0, 1) for a sample when the y score is missing.
function jitter(i) {
  const x = Math.sin(i * 12.9898 + 78.233) * 43758.5453;
  return x - Math.floor(x);
}

function axes(g, x, y, xs, ys, W, H, M, xLabel, yLabel) {
  const grid = s("g", {class: "grid"});
  const ax = s("g", {class: "axis"});
  for (const t of xs) {
    grid.append(s("line", {x1: x(t), x2: x(t), y1: M.t, y2: H - M.b}));
    ax.append(s("text", {x: x(t), y: H - M.b + 14, "text-anchor": "middle"}, fmtNum(t)));
  }
  for (const t of ys) {
    grid.append(s("line", {x1: M.l, x2: W - M.r, y1: y(t), y2: y(t)}));
    ax.append(s("text", {x: M.l - 6, y: y(t) + 4, "text-anchor": "end"}, fmtNum(t)));
  }
  ax.append(s("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b}), s("line", {x1: M.l, x2: M.l, y1: M.t, y2: H - M.b}));
  ax.append(s("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle"}, xLabel));
  ax.append(s("text", {x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})`}, yLabel));
  g.append(grid, ax);
}

function scatterFigure(rows, method) {
  const has = (k) => rows.some((r) => r[k] !== null && Number.isFinite(r[k]));
  const xKey = has("influence") ? "influence" : has("overall") ? "overall" : null;
  const yKey = has("effort") ? "effort" : null;
  const fig = h("figure", {id: "scatter-figure"});
  fig.append(h("h3", {text: "Influence against effort, every sample"}));
  if (!xKey) {
    fig.append(h("p", {class: "note", id: "scatter-none",
      text: `Method '${method}' computes no per-sample score: there is nothing to plot (scores.csv lists the samples).`}));
    return fig;
  }
  const W = chartWidth(), H = Math.round(W * 0.66), M = {l: 58, r: 14, t: 12, b: 42};
  const [x0, x1] = extent(rows.map((r) => r[xKey]));
  const [y0, y1] = yKey ? extent(rows.map((r) => r[yKey])) : [0, 1];
  const x = (v) => M.l + ((v - x0) / (x1 - x0)) * (W - M.l - M.r);
  const y = (v) => H - M.b - ((v - y0) / (y1 - y0)) * (H - M.t - M.b);
  const svg = s("svg", {class: "chart", id: "scatter", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `Scatter of ${xKey} against ${yKey || "a spread"} for ${rows.length} samples; ` +
      `${rows.filter((r) => r.selected).length} selected, ${rows.filter((r) => r.pruned).length} hard-pruned`});
  axes(svg, x, y, ticks(x0, x1), yKey ? ticks(y0, y1) : [], W, H, M, xKey,
    yKey || "(no effort score: samples spread out)");
  const layer = s("g", {});
  const order = [...rows.filter((r) => !r.selected && !r.pruned), ...rows.filter((r) => r.pruned), ...rows.filter((r) => r.selected)];
  for (const r of order) {
    const xv = r[xKey];
    if (xv === null || !Number.isFinite(xv)) continue;
    const yv = yKey ? r[yKey] : y0 + (0.05 + 0.9 * jitter(r.index)) * (y1 - y0);
    if (yv === null || !Number.isFinite(yv)) continue;
    layer.append(s("circle", {class: `pt${r.selected ? " selected" : ""}${r.pruned ? " pruned" : ""}`,
      cx: x(xv).toFixed(1), cy: y(yv).toFixed(1), r: r.selected ? 3.4 : 2.4, "data-user": r.user}));
  }
  svg.append(layer);
  fig.append(svg, h("div", {class: "legend"},
    h("span", {}, h("span", {class: "sw all"}), "all samples"),
    h("span", {}, h("span", {class: "sw selected"}), `selected (${rows.filter((r) => r.selected).length})`),
    h("span", {}, h("span", {class: "sw pruned"}), `hard-pruned (${rows.filter((r) => r.pruned).length})`)),
  h("figcaption", {text: yKey ? "Each point is one sample; the selection spreads over the strata of the overall score."
    : `Method '${method}' computed no effort: the vertical position is only a spread to make the points visible.`}));
  return fig;
}

function strataFigure(diag, method) {
  const fig = h("figure", {id: "strata-figure"});
  fig.append(h("h3", {text: "Strata: size against taken"}));
  const st = diag && diag.strata;
  if (!st || !st.count) {
    fig.append(h("p", {class: "note", id: "strata-none", text: `Method '${method}' does not stratify the samples.`}));
    return fig;
  }
  const rows = st.rows;
  const W = chartWidth(), H = Math.round(W * 0.47), M = {l: 48, r: 10, t: 10, b: 36};
  const top = Math.max(...rows.map((r) => r.size), 1);
  const bw = (W - M.l - M.r) / rows.length;
  const y = (v) => H - M.b - (v / top) * (H - M.t - M.b);
  const svg = s("svg", {class: "chart", id: "strata", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${rows.length} strata; ${st.taken_whole} taken whole`});
  axes(svg, () => 0, y, [], ticks(0, top), W, H, M, "stratum (low to high overall score)", "samples");
  rows.forEach((r, i) => {
    const x = M.l + i * bw;
    svg.append(s("rect", {class: "size", x: (x + bw * 0.08).toFixed(1), y: y(r.size).toFixed(1),
      width: Math.max(0.5, bw * 0.84).toFixed(1), height: (H - M.b - y(r.size)).toFixed(1)},
    s("title", {}, `stratum ${r.stratum}: ${r.size} samples, ${r.taken} taken${r.whole ? " (whole)" : ""}`)));
    svg.append(s("rect", {class: "taken", x: (x + bw * 0.22).toFixed(1), y: y(r.taken).toFixed(1),
      width: Math.max(0.5, bw * 0.56).toFixed(1), height: (H - M.b - y(r.taken)).toFixed(1)}));
    if (i % Math.max(1, Math.ceil(20 / bw)) === 0) {  // labels at least 20 units apart
      svg.append(s("text", {x: (x + bw / 2).toFixed(1), y: H - M.b + 13, "text-anchor": "middle"}, String(r.stratum)));
    }
  });
  fig.append(svg, h("div", {class: "legend"},
    h("span", {}, h("span", {class: "sw size"}), "stratum size"),
    h("span", {}, h("span", {class: "sw taken"}), "taken into the selection")),
  h("figcaption", {text: `${st.count} strata, ${st.taken_whole} taken whole, giving ` +
    `${(100 * st.budget_share_from_whole_strata).toFixed(1)}% of the selection.`}));
  return fig;
}

const FEATURES = [["history_length", "history length (items)"], ["prompt_tokens", "prompt tokens"],
  ["target_popularity", "target-item popularity"]];

function featuresFigure(diag) {
  const fig = h("figure", {id: "features-figure"});
  fig.append(h("h3", {text: "Selected against all"}));
  const feats = FEATURES.filter(([k]) => diag.features && diag.features[k]);
  const groups = [["all", "all"], ["selected", "selected"], ["pruned", "hard-pruned"]];
  const rowH = 22, gap = 26, W = chartWidth(), M = {l: 96, r: 16};
  let H = 10;
  const layout = feats.map(([k, label]) => {
    const present = groups.filter(([g]) => diag.features[k][g] && diag.features[k][g].p50 !== null);
    const top = H + 16;
    H = top + present.length * rowH + gap;
    return {k, label, present, top};
  });
  const svg = s("svg", {class: "chart", id: "features", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "Quantiles (10, 25, 50, 75, 90) and means of each feature, selected against all"});
  for (const {k, label, present, top} of layout) {
    const f = diag.features[k];
    const vals = present.flatMap(([g]) => [f[g].p10, f[g].p90, f[g].mean]).filter((v) => v !== null);
    const lo = Math.min(...vals), hi = Math.max(...vals) === lo ? lo + 1 : Math.max(...vals);
    const x = (v) => M.l + ((v - lo) / (hi - lo)) * (W - M.l - M.r);
    svg.append(s("text", {x: M.l, y: top - 4, "font-weight": 600}, `${label}: ${fmtNum(lo)} … ${fmtNum(hi)}`));
    present.forEach(([g, name], i) => {
      const q = f[g], cy = top + i * rowH + rowH / 2;
      const row = s("g", {class: `feature ${g}`, "data-feature": k});
      row.append(s("text", {x: M.l - 8, y: cy + 4, "text-anchor": "end"}, name),
        s("line", {class: "whisker", x1: x(q.p10), x2: x(q.p90), y1: cy, y2: cy}),
        s("rect", {class: `box ${g}`, x: x(q.p25), y: cy - 7, width: Math.max(1, x(q.p75) - x(q.p25)), height: 14},
          s("title", {}, `${name}: p10 ${q.p10}, p25 ${q.p25}, median ${q.p50}, p75 ${q.p75}, p90 ${q.p90}, mean ${q.mean}`)),
        s("line", {class: "median", x1: x(q.p50), x2: x(q.p50), y1: cy - 8, y2: cy + 8}),
        s("circle", {class: "mean", cx: x(q.mean), cy, r: 3.2}));
      svg.append(row);
    });
  }
  fig.append(svg, h("div", {class: "legend"},
    h("span", {}, h("span", {class: "sw boxall"}), "all"), h("span", {}, h("span", {class: "sw taken"}), "selected"),
    h("span", {}, h("span", {class: "sw boxpruned"}), "hard-pruned")),
  h("figcaption", {text: "Box: 25th-75th percentile, bar: median, whiskers: 10th-90th percentile, dot: mean."}));
  return fig;
}

function spearmanTable(diag) {
  const entries = Object.entries(diag.spearman || {}).filter(([, v]) => v && typeof v === "object");
  if (!entries.length) return h("div");
  return h("div", {}, h("h3", {text: "Spearman correlation of each score with"}),
    h("div", {class: "table-wrap"}, h("table", {id: "spearman"},
      h("thead", {}, h("tr", {}, h("th", {text: "score"}), h("th", {class: "num", text: "prompt tokens"}),
        h("th", {class: "num", text: "history length"}))),
      h("tbody", {}, entries.map(([name, v]) => h("tr", {}, h("td", {text: name}),
        h("td", {class: "num", text: v.prompt_tokens === undefined || v.prompt_tokens === null ? "–" : v.prompt_tokens.toFixed(3)}),
        h("td", {class: "num", text: v.history_length === undefined || v.history_length === null ? "–" : v.history_length.toFixed(3)})))))));
}

function metricsBlock(result) {
  if (!result || (!result.finetune && !result.metrics)) return null;
  const box = h("div", {id: "metrics"}, h("h2", {text: "Fine-tuning and evaluation"}));
  if (result.finetune) {
    const f = result.finetune;
    box.append(h("dl", {class: "kv", id: "finetune-result"},
      [["epochs run", f.epochs_run], ["best epoch", f.best_epoch], ["stopped early", f.stopped_early],
        ["optimizer steps", f.steps], ["training samples", f.train_samples], ["validation samples", f.valid_samples],
        ["training time", f.train_seconds !== undefined ? fmtSeconds(f.train_seconds) : undefined], ["precision", f.precision]]
        .filter(([, v]) => v !== undefined && v !== null).map(([k, v]) => [h("dt", {text: k}), h("dd", {text: String(v)})])));
  }
  if (result.metrics) {
    const m = result.metrics;
    const ks = [10, 20, 50].filter((k) => m[`recall@${k}`] !== undefined);
    box.append(h("div", {class: "table-wrap"}, h("table", {id: "eval-metrics"},
      h("thead", {}, h("tr", {}, h("th", {text: "metric"}), ks.map((k) => h("th", {class: "num", text: `@${k}`})))),
      h("tbody", {}, ["recall", "ndcg"].map((name) => h("tr", {}, h("td", {text: name}),
        ks.map((k) => h("td", {class: "num", text: Number(m[`${name}@${k}`]).toFixed(4)}))))))),
    h("p", {class: "help", text: `${m.users ?? "?"} test users${m.nll !== undefined && m.nll !== null ? `; mean NLL of the true answer ${Number(m.nll).toFixed(3)}` : ""}.`}));
  }
  return box;
}

// ------------------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", route);
