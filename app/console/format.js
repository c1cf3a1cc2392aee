// How values read on the page: times, numbers, durations, a status badge, and where a dataset error
// points. One place, so that a number or an error location reads the same on every view.

import {h} from "./dom.js";

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || x === "") return "";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  return Math.abs(x) >= 1000 ? x.toFixed(0) : Number(x.toPrecision(digits)).toString();
}

export function fmtSeconds(sec) {
  if (sec === null || sec === undefined) return "";
  if (sec < 60) return `${sec.toFixed(sec < 10 ? 2 : 1)} s`;
  const m = Math.floor(sec / 60), r = Math.round(sec % 60);
  return m < 60 ? `${m} min ${r} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function badge(status) { return h("span", {class: `badge ${status}`, text: status}); }

// Where a dataset error points: "items.tsv, line 3, field 'title'".
export function where(e) {
  return [e.file, e.line ? `line ${e.line}` : null, e.field ? `field '${e.field}'` : null].filter(Boolean).join(", ");
}

export function errorList(errors) {
  return h("ul", {class: "errors"}, errors.map((e) => {
    const w = where(e);
    return h("li", {}, w ? h("span", {class: "where", text: w}) : null, w ? " — " : null, e.message || e.code);
  }));
}
