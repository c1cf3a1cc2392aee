// The new-job page: a form built from the OpenAPI schema of PruneRequest (defaults, ranges, choices),
// so that a parameter the API gains appears here without an edit; it sends only what differs from the
// defaults, and puts an API error on the field it names.

import {api, listAll, openapi, randomKey} from "./api.js";
import {$, clear, h} from "./dom.js";
import {fmtNum} from "./format.js";
import {showError, viewToken} from "./view.js";

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

export async function newJobView(main, token, query) {
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
