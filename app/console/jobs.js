// The jobs pages: the list (status filter, paging) and one job's page (live status, progress, ETA,
// stages, events, cancel, downloads), both polled while a job is not finished.

import {api} from "./api.js";
import {clear, h} from "./dom.js";
import {badge, fmtNum, fmtSeconds, fmtTime, where} from "./format.js";
import {renderReport} from "./report.js";
import {poll, showError, viewToken} from "./view.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const POLL_MS = 1000;

// ------------------------------------------------------------------------------------------------
// Jobs list

const cursorStack = [];

export async function jobsView(main, token, query) {
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
        h("td", {text: j.status === "running" ? `${j.stage || ""} ${Math.round(100 * j.progress)}%` : (j.status === "succeeded" ? "100%" : heldText(j))}),
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
// One job: live status, events, downloads; the selection report once it succeeded (report.js)

export async function jobView(main, token, jobId) {
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
      h("span", {id: "job-progress-text", text: `${pct}%${job.stage ? ` · ${job.stage}` : ""}${eta ? ` · ${eta}` : ""}${job.held_position ? ` · ${heldText(job)}` : ""}`}),
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

// A queued job held by fair dispatch (DEALREC_TENANT_MAX_RUNNING): its place in line.
function heldText(job) {
  return job.held_position ? `held: #${job.held_position} in line, until one of your running jobs ends` : "";
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
