// The trainfleet operator dashboard: one page, no framework, no build step.
//
// It keeps the operator token in sessionStorage, polls GET /v1/dashboard every POLL_MS and
// redraws the open tab from that one summary. Every string the coordinator sends (job names,
// log lines, hostnames, reasons) goes into the page as text (textContent, text nodes,
// setAttribute), never as HTML; charts are SVG built with createElementNS. Actions (cancel,
// requeue, revoke) call the coordinator's existing operator endpoints after a confirmation.
"use strict";

const TOKEN_KEY = "trainfleet.operatorToken";
const POLL_MS = 2000;
const TABS = ["fleet", "queue", "runs", "market", "fair-share"];
const STATES = ["waiting", "pending", "claimed", "running", "completed", "failed", "cancelled"];
const GROUPS = ["running", "failed", "pending", "waiting", "completed", "cancelled"];
const SVG_NS = "http://www.w3.org/2000/svg";

const page = {
  data: null, // the last summary
  updatedAt: 0, // when it arrived (ms)
  timer: 0,
  action: null, // the action the open dialog confirms
};

// elements ----------------------------------------------------------------------------------
function $(id) {
  return document.getElementById(id);
}

// el("td", {class: "num", "data-testid": "x"}, "text", childNode, ...): attributes are set
// with setAttribute and children added as nodes or text nodes, so data stays text.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function table(testid, headers, rows, empty) {
  if (!rows.length) return el("p", { class: "muted", "data-testid": `${testid}-empty` }, empty);
  return el(
    "table",
    { "data-testid": testid },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows),
  );
}

function section(title, ...children) {
  return el("div", { class: "card" }, el("h2", {}, title), ...children);
}

// formatting ----------------------------------------------------------------------------------
function fixed(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return `${s}s ago`;
  if (s < 7200) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
}

function short(id) {
  return id ? String(id).slice(0, 12) : "–";
}

function capability(cap) {
  const parts = [`${cap.cores} cores`, `${fixed(cap.ram_gib, 1)} GiB RAM`];
  if (cap.cuda) parts.push(`${cap.num_gpus} GPU, ${fixed(cap.vram_gib, 1)} GiB VRAM`);
  else parts.push("no CUDA");
  return parts.join(", ");
}

// the coordinator -----------------------------------------------------------------------------
class Unauthorized extends Error {}

async function call(method, path) {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (response.status === 401) throw new Unauthorized(errorText(response, body));
  if (!response.ok) throw new Error(errorText(response, body));
  return body;
}

function errorText(response, body) {
  const message = body && typeof body.message === "string" ? body.message : response.statusText;
  return `${response.status}: ${message}`;
}

// login ----------------------------------------------------------------------------------------
function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(page.timer);
  page.data = null;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("banner").hidden = true;
  $("updated").textContent = "";
  $("login").hidden = false;
  $("login-message").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  showTab(currentTab());
  poll();
}

function currentTab() {
  const name = location.hash.replace("#", "");
  return TABS.includes(name) ? name : "fleet";
}

function showTab(name) {
  for (const tab of TABS) {
    $(`tab-${tab}`).hidden = tab !== name;
    const button = document.querySelector(`[data-tab="${tab}"]`);
    button.setAttribute("aria-selected", String(tab === name));
  }
  if (page.data) render(page.data);
}

// polling ----------------------------------------------------------------------------------------
async function poll() {
  clearTimeout(page.timer);
  if ($("confirm").open) {
    page.timer = setTimeout(poll, POLL_MS); // a dialog is open: keep the page as it is
    return;
  }
  try {
    const data = await call("GET", "v1/dashboard");
    page.data = data;
    page.updatedAt = Date.now();
    $("banner").hidden = true;
    $("version").textContent = `coordinator ${data.version}`;
    render(data);
  } catch (err) {
    if (err instanceof Unauthorized) {
      showLogin(`The coordinator refused the token (${err.message}). Enter the operator token.`);
      return;
    }
    const what = err instanceof TypeError ? "coordinator unreachable" : "dashboard request failed";
    $("banner").textContent = `${what}: ${err.message}; retrying every ${POLL_MS / 1000} s`;
    $("banner").hidden = false;
  }
  tickUpdated();
  page.timer = setTimeout(poll, POLL_MS);
}

function tickUpdated() {
  if (!page.updatedAt) return;
  const seconds = Math.round((Date.now() - page.updatedAt) / 1000);
  $("updated").textContent = `updated ${seconds}s ago`;
}

function render(data) {
  const name = currentTab();
  const renderers = {
    fleet: renderFleet,
    queue: renderQueue,
    runs: renderRuns,
    market: renderMarket,
    "fair-share": renderFairShare,
  };
  $(`tab-${name}`).replaceChildren(...renderers[name](data));
  for (const log of document.querySelectorAll(".log")) log.scrollTop = log.scrollHeight; // newest lines
}

// fleet ------------------------------------------------------------------------------------------
function renderFleet(data) {
  const now = data.generated_at;
  const names = jobNames(data);
  const online = data.workers.filter((w) => w.state === "online").length;
  const workers = data.workers.map((w) =>
    el(
      "tr",
      { "data-testid": "worker-row", "data-worker-id": w.id, "data-state": w.state },
      el("td", {}, w.id),
      el("td", {}, w.host),
      el("td", {}, w.capability.hostname),
      el("td", {}, el("span", { class: `state state-${w.state}` }, w.state)),
      el("td", { "data-testid": "effective" }, capability(w.effective)),
      el("td", { class: "notes" }, w.notes.length ? w.notes.join("; ") : "none"),
      el("td", { "data-testid": "current-job" }, w.current_job ? names[w.current_job] || short(w.current_job) : "–"),
      el("td", {}, ago(now - w.last_seen)),
      el("td", {}, w.state === "revoked" ? "" : actionButton("revoke", "Revoke", () => confirmRevoke(w))),
    ),
  );
  const hosts = data.hosts.map((h) =>
    el(
      "tr",
      { "data-testid": "host-row", "data-host": h.name },
      el("td", {}, h.name),
      el("td", {}, el("span", { class: `state state-${h.state}` }, h.state)),
      el("td", { class: "num" }, h.workers_online),
      el("td", {}, ago(now - h.enrolled_at)),
    ),
  );
  return [
    countsBar(data),
    el("p", { class: "muted" }, "workers online: ", el("strong", { "data-testid": "workers-online" }, online)),
    section(
      "Workers",
      table(
        "workers",
        ["worker", "host", "hostname", "state", "effective capability", "corrections", "current job", "last beat", ""],
        workers,
        "No worker has registered yet.",
      ),
    ),
    section("Enrolled hosts", table("hosts", ["host", "state", "workers online", "enrolled"], hosts, "No host enrolled (open mode, or none yet).")),
  ];
}

function jobNames(data) {
  const names = {};
  for (const group of Object.values(data.jobs)) for (const j of group.jobs) names[j.job.id] = j.job.name;
  return names;
}

function countsBar(data) {
  return el(
    "div",
    { class: "counts" },
    STATES.map((state) =>
      el(
        "div",
        { class: `count state-${state}` },
        el("span", { class: "count-number", "data-testid": `count-${state}` }, data.counts[state] || 0),
        el("span", { class: "count-label" }, state),
      ),
    ),
  );
}

// queue ------------------------------------------------------------------------------------------
function renderQueue(data) {
  const out = [countsBar(data)];
  for (const group of GROUPS) {
    const g = data.jobs[group];
    if (!g) continue;
    const shown = g.jobs.length < g.total ? ` (${g.jobs.length} shown)` : "";
    out.push(
      el(
        "div",
        { class: "card", "data-testid": `group-${group}` },
        el("h2", {}, `${group} `, el("span", { class: "muted", "data-testid": `group-total-${group}` }, g.total), shown),
        g.jobs.length ? el("ul", { class: "jobs" }, g.jobs.map((j) => jobItem(j, data.generated_at))) : el("p", { class: "muted" }, "none"),
      ),
    );
  }
  return out;
}

function jobItem(entry, now) {
  const job = entry.job;
  const facts = [`priority ${job.priority}`, `attempt ${job.attempt}`];
  if (job.host) facts.push(`host ${job.host}`);
  if (job.spec.submitter) facts.push(`for ${job.spec.submitter}`);
  if (job.state === "running" || job.state === "claimed") facts.push(`last beat ${ago(job.heartbeat_at ? now - job.heartbeat_at : null)}`);
  const item = el(
    "li",
    { class: "job", "data-testid": "job-row", "data-job-name": job.name, "data-job-id": job.id, "data-state": job.state },
    el(
      "div",
      { class: "job-head" },
      el("span", { class: `state state-${job.state}`, "data-testid": "job-state" }, job.state),
      el("strong", { class: "job-name", "data-testid": "job-name" }, job.name),
      el("span", { class: "muted" }, short(job.id)),
      el("span", { class: "muted" }, facts.join(" · ")),
      el("span", { class: "spacer" }),
      jobActions(job),
    ),
  );
  if (entry.explain) item.append(el("p", { class: "explain", "data-testid": "explain" }, entry.explain));
  if (job.error) item.append(el("p", { class: "error", "data-testid": "job-error" }, job.error));
  if (entry.log_tail.length) {
    item.append(el("pre", { class: "log", "data-testid": "log-tail" }, entry.log_tail.map((l) => l.line).join("\n")));
  }
  return item;
}

function jobActions(job) {
  if (["waiting", "pending", "claimed", "running"].includes(job.state)) {
    return actionButton("cancel", "Cancel", () => confirmJob(job, "cancel"));
  }
  return actionButton("requeue", "Requeue", () => confirmJob(job, "requeue"));
}

// runs -------------------------------------------------------------------------------------------
function renderRuns(data) {
  if (!data.runs.length) return [el("p", { class: "muted", "data-testid": "runs-empty" }, "No collaborative run.")];
  return data.runs.map(runCard);
}

function runCard(entry) {
  const run = entry.run;
  const rounds = entry.rounds;
  const rows = rounds.map((r, i) =>
    el(
      "tr",
      { "data-testid": "round-row", "data-round": r.round },
      el("td", { class: "num" }, r.round),
      el("td", {}, r.state),
      el("td", { class: "num", "data-testid": "round-loss" }, fixed(r.heldout_loss, 4)),
      el("td", { class: "num" }, r.accepted),
      el("td", { class: "num" }, r.refused),
      el("td", { class: "num", "data-testid": "round-bytes-up" }, r.bytes_up),
      el("td", { class: "num", "data-testid": "round-bytes-down" }, r.bytes_down),
      el("td", { "data-testid": "participants" }, entry.participants[i].join(", ") || "–"),
      el("td", { class: "num" }, r.wall_s === null ? "–" : `${r.wall_s.toFixed(1)}s`),
    ),
  );
  const refused = entry.refused.map((c) =>
    el(
      "tr",
      { "data-testid": "refused-row" },
      el("td", { class: "num" }, c.round),
      el("td", { class: "num" }, c.replica),
      el("td", {}, c.worker_id),
      el("td", {}, c.reason),
    ),
  );
  return el(
    "div",
    { class: "card", "data-testid": "run", "data-run-name": run.name },
    el(
      "h2",
      {},
      `${run.name} `,
      el("span", { class: `state state-${run.state}`, "data-testid": "run-state" }, run.state),
      el("span", { class: "muted" }, ` round ${Math.min(run.round, run.num_rounds)} of ${run.num_rounds}`),
    ),
    el(
      "div",
      { class: "charts" },
      chart("loss-chart", "held-out loss per round", [{ name: "loss", cls: "line-loss", values: rounds.map((r) => [r.round, r.heldout_loss]) }], (v) => v.toFixed(3), false),
      chart(
        "bytes-chart",
        "bytes per round",
        [
          { name: "up", cls: "line-up", values: rounds.map((r) => [r.round, r.bytes_up]) },
          { name: "down", cls: "line-down", values: rounds.map((r) => [r.round, r.bytes_down]) },
        ],
        bytes,
        true,
      ),
    ),
    table("rounds", ["round", "state", "loss", "accepted", "refused", "bytes up", "bytes down", "participants", "wall"], rows, "No round yet."),
    el("h3", {}, "Refused contributions"),
    table("refused", ["round", "replica", "worker", "reason"], refused, "None refused."),
  );
}

// A line chart: x = round, one polyline (and its points) per series; null values are skipped.
// fromZero: the y axis starts at 0 (bytes), else at the smallest value (loss).
function chart(testid, title, series, label, fromZero) {
  const w = 420;
  const h = 160;
  const pad = { left: 64, right: 12, top: 22, bottom: 24 };
  const points = series.flatMap((s) => s.values.filter((p) => p[1] !== null && p[1] !== undefined));
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, class: "chart", "data-testid": testid, role: "img" });
  root.append(svg("title", {}, title), svg("text", { x: pad.left, y: 14, class: "chart-title" }, title));
  if (!points.length) {
    root.append(svg("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "muted" }, "no data yet"));
    return root;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [fromZero ? 0 : Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad.left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - pad.left - pad.right);
  const sy = (y) => h - pad.bottom - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (h - pad.top - pad.bottom);
  root.append(
    svg("line", { x1: pad.left, y1: h - pad.bottom, x2: w - pad.right, y2: h - pad.bottom, class: "axis" }),
    svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: h - pad.bottom, class: "axis" }),
    svg("text", { x: pad.left - 4, y: sy(y1) + 4, "text-anchor": "end", class: "tick" }, label(y1)),
    svg("text", { x: pad.left - 4, y: sy(y0) + 4, "text-anchor": "end", class: "tick" }, label(y0)),
    svg("text", { x: sx(x0), y: h - 6, "text-anchor": x1 === x0 ? "middle" : "start", class: "tick" }, `round ${x0}`),
  );
  if (x1 !== x0) root.append(svg("text", { x: sx(x1), y: h - 6, "text-anchor": "end", class: "tick" }, `round ${x1}`));
  series.forEach((s, i) => {
    const pts = s.values.filter((p) => p[1] !== null && p[1] !== undefined);
    root.append(svg("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), class: `line ${s.cls}` }));
    for (const p of pts) {
      const dot = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, class: `dot ${s.cls}`, "data-round": p[0], "data-value": p[1] });
      dot.append(svg("title", {}, `${s.name}, round ${p[0]}: ${label(p[1])}`));
      root.append(dot);
    }
    if (series.length > 1) root.append(svg("text", { x: w - pad.right - 40 * (series.length - i), y: 14, class: `legend ${s.cls}` }, s.name));
  });
  return root;
}

// market and fair share ------------------------------------------------------------------------
function renderMarket(data) {
  const market = data.market;
  const competitions = market.competitions.map((c) => {
    const comp = c.competition;
    const rows = c.leaderboard.map((s, i) =>
      el(
        "tr",
        { "data-testid": "leaderboard-row", "data-submission": s.id },
        el("td", { class: "num" }, i + 1),
        el("td", { class: "num" }, s.seq),
        el("td", {}, s.producer),
        el("td", { class: "num", "data-testid": "trusted-score" }, fixed(s.trusted_score, 4)),
        el("td", { class: "num" }, fixed(s.improvement, 4)),
        el("td", { class: "num", "data-testid": "paid" }, fixed(s.paid, 2)),
      ),
    );
    return el(
      "div",
      { class: "card", "data-testid": "competition", "data-competition": comp.name },
      el("h2", {}, comp.name),
      el(
        "p",
        { class: "muted" },
        `baseline ${fixed(comp.baseline_score, 4)} · frontier `,
        el("strong", { "data-testid": "frontier-score" }, fixed(comp.frontier_score, 4)),
        ` · refereeing ${c.refereeing}`,
      ),
      table("leaderboard", ["#", "submission", "producer", "trusted score", "improvement", "paid"], rows, "No accepted submission yet."),
    );
  });
  const balances = Object.entries(market.balances).map(([account, amount]) =>
    el("tr", { "data-testid": "balance-row", "data-account": account }, el("td", {}, account), el("td", { class: "num" }, fixed(amount, 2))),
  );
  const ledger = market.ledger.map((e) =>
    el(
      "tr",
      { "data-testid": "ledger-row" },
      el("td", { class: "num" }, e.seq),
      el("td", {}, e.account),
      el("td", { class: "num", "data-testid": "ledger-amount" }, fixed(e.amount, 2)),
      el("td", { class: "num" }, `${fixed(e.frontier_before, 4)} → ${fixed(e.frontier_after, 4)}`),
      el("td", {}, short(e.submission_id)),
    ),
  );
  return [
    el("p", {}, "total paid: ", el("strong", { "data-testid": "total-paid" }, fixed(market.total_paid, 2))),
    ...(competitions.length ? competitions : [el("p", { class: "muted" }, "No competition.")]),
    section("Balances", table("balances", ["account", "paid"], balances, "Nobody has been paid yet.")),
    section("Ledger (newest first)", table("ledger", ["#", "account", "amount", "frontier", "submission"], ledger, "The ledger is empty.")),
  ];
}

function renderFairShare(data) {
  const report = data.fair_share;
  if (!report) return [el("p", { class: "muted" }, "Fair share is not available.")];
  const rows = report.submitters.map((s) =>
    el(
      "tr",
      { "data-testid": "fair-share-row", "data-submitter": s.submitter },
      el("td", {}, s.submitter),
      el("td", { class: "num" }, fixed(s.usage_h, 3)),
      el("td", { class: "num" }, `${fixed(100 * s.usage, 1)}%`),
      el("td", { class: "num" }, `${fixed(100 * s.share, 1)}%`),
      el("td", { class: "num" }, fixed(s.factor, 3)),
      el("td", { class: "num", "data-testid": "level" }, s.level),
      el("td", { class: "num", "data-testid": "fs-pending" }, s.pending),
      el("td", { class: "num" }, s.waiting),
      el("td", { class: "num" }, s.running),
    ),
  );
  return [
    section(
      "Fair share",
      el("p", { class: "muted" }, `usage decays with a half-life of ${report.half_life_h} h; levels are recomputed every ${report.interval_s} s; lower levels are claimed first`),
      table("fair-share", ["submitter", "usage (job-h)", "usage", "share", "factor", "level", "pending", "waiting", "running"], rows, "No submitter yet."),
    ),
  ];
}

// actions ----------------------------------------------------------------------------------------
function actionButton(kind, text, onClick) {
  const button = el("button", { type: "button", class: `action action-${kind}`, "data-testid": kind }, text);
  button.addEventListener("click", onClick);
  return button;
}

function confirmJob(job, verb) {
  const what = verb === "cancel" ? "Cancel" : "Requeue";
  const path = `v1/jobs/${encodeURIComponent(job.id)}/${verb}`;
  ask(`${what} job ${job.name} (${short(job.id)}), now ${job.state}?`, `${what} job`, path, (body) => `job ${body.name} is now ${body.state}`);
}

function confirmRevoke(worker) {
  const path = `v1/workers/${encodeURIComponent(worker.id)}/revoke`;
  ask(
    `Revoke worker ${worker.id} on host ${worker.host}? Its credential stops working and its job is requeued.`,
    "Revoke worker",
    path,
    (body) => `worker ${body.revoked} revoked; ${body.requeued.length} job(s) requeued`,
  );
}

function ask(question, confirmText, path, describe) {
  page.action = { path, describe };
  $("confirm-text").textContent = question;
  $("confirm-yes").textContent = confirmText;
  $("confirm").showModal();
}

async function confirmed() {
  const action = page.action;
  $("confirm").close();
  if (!action) return;
  try {
    showResult(action.describe(await call("POST", action.path)), false);
  } catch (err) {
    if (err instanceof Unauthorized) {
      showLogin(`The coordinator refused the token (${err.message}). Enter the operator token.`);
      return;
    }
    showResult(`refused: ${err.message}`, true);
  }
  poll();
}

function showResult(text, failed) {
  const result = $("action-result");
  result.textContent = text;
  result.className = failed ? "action-result error" : "action-result";
  result.hidden = false;
}

// start ------------------------------------------------------------------------------------------
function start() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("login-message").textContent = "";
    showApp();
  });
  $("logout").addEventListener("click", () => showLogin("Logged out."));
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.addEventListener("click", () => {
      location.hash = button.dataset.tab;
    });
  }
  window.addEventListener("hashchange", () => showTab(currentTab()));
  $("confirm-yes").addEventListener("click", confirmed);
  $("confirm-no").addEventListener("click", () => $("confirm").close());
  $("confirm").addEventListener("close", () => {
    page.action = null;
  });
  setInterval(tickUpdated, 1000);
  if (sessionStorage.getItem(TOKEN_KEY)) showApp();
  else showLogin("");
}

document.addEventListener("DOMContentLoaded", start);
