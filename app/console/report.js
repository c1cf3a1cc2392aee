// The selection report of a succeeded job ("why these samples"): its scores.csv and diagnostics.json
// read, then the charts (charts.js), the Spearman table and the fine-tuning / evaluation metrics.

import {api} from "./api.js";
import {featuresFigure, scatterFigure, strataFigure} from "./charts.js";
import {h} from "./dom.js";
import {fmtSeconds} from "./format.js";
import {viewToken} from "./view.js";

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

export async function renderReport(box, job, token) {
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
    h("p", {class: "help", text: evaluationNote(m)}));
  }
  return box;
}

// The dense signals beside Recall/NDCG: where the true item lands in the whole ranking, its NLL.
function evaluationNote(m) {
  const has = (v) => v !== undefined && v !== null;
  const parts = [];
  if (has(m.rank_pct)) parts.push(`the true item at ${Number(m.rank_pct).toFixed(1)} % of the ranking on average`);
  if (has(m.nll)) parts.push(`mean NLL of the true answer ${Number(m.nll).toFixed(3)}`);
  return `${m.users ?? "?"} test users` + parts.map((p) => `; ${p}`).join("") + (parts.length ? " (lower is better)." : ".");
}
