// The report's charts, drawn as SVG by hand (no chart library, nothing fetched from elsewhere): the
// scatter of every sample, the strata's size against what was taken, and selected against all.

import {h, s} from "./dom.js";
import {fmtNum} from "./format.js";

// Charts are drawn in a narrower coordinate space on a phone, so that their labels stay legible.
const chartWidth = () => (window.innerWidth < 600 ? 400 : 640);

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

export function scatterFigure(rows, method) {
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

export function strataFigure(diag, method) {
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

export function featuresFigure(diag) {
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
