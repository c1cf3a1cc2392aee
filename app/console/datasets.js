// The datasets page: the upload form (files or one archive, chosen or dropped; the worker's
// validation awaited and its file/line/field errors shown) and the list of the tenant's datasets.

import {api, listAll} from "./api.js";
import {$, clear, h} from "./dom.js";
import {badge, errorList, fmtNum, fmtTime} from "./format.js";
import {showError, viewToken} from "./view.js";

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  for (const [k, label] of [["users", "users"], ["items", "items"], ["train_interactions", "train interactions"],
    ["mean_train_length", "mean length"], ["users_with_test", "with a test item"]]) {
    if (stats[k] !== undefined) parts.push(`${fmtNum(stats[k])} ${label}`);
  }
  return parts.join(" · ");
}

export async function datasetsView(main, token) {
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
