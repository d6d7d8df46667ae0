// The radstream dashboard: logs in with a reading API bearer token, then shows what the user's role
// may see (GET /api/v1/dashboard says which panels) and refreshes it. The token stays in this tab's
// sessionStorage and goes out only as "Authorization: Bearer" on fetches to this origin; no cookie.
// Text from the server is only ever set as textContent, never parsed as HTML.
"use strict";

const TOKEN_KEY = "radstream.dashboard.token";
const PLOT_CONFIG = { displaylogo: false, responsive: true };
let refreshTimer = null;

function $(id) {
  return document.getElementById(id);
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` },
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.detail) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// ------------------------------------------------------------------ time

function parseTime(text) {
  return text ? new Date(text) : null;
}

function clock(date) {
  return date.toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function untilText(deadline, now) {
  const minutes = Math.round((deadline - now) / 60000);
  if (minutes < 0) return `overdue ${-minutes} min`;
  if (minutes < 120) return `in ${minutes} min`;
  return `in ${Math.round(minutes / 60)} h`;
}

// ------------------------------------------------------------------ log-in

function showLogin(error) {
  clearInterval(refreshTimer);
  refreshTimer = null;
  for (const id of ["session", "worklist-panel", "alerts-panel", "plots-panel", "problem"]) $(id).hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !error;
  $("login-error").textContent = error || "";
  $("token").value = "";
  $("token").focus();
}

function logOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const body of document.querySelectorAll("tbody")) body.replaceChildren();
  for (const plot of document.querySelectorAll(".plot")) Plotly.purge(plot);
  $("plots").replaceChildren();
  showLogin(null);
}

async function start() {
  let me;
  try {
    me = await api("/api/v1/dashboard");
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(error.status === 401 ? `Log-in refused: ${error.message}` : `Cannot log in: ${error.message}`);
    return;
  }
  $("login").hidden = true;
  $("session").hidden = false;
  $("user").textContent = `${me.name || me.id} (${me.role}${me.sites.length ? ", " + me.sites.join(", ") : ""})`;
  $("worklist-panel").hidden = !me.panels.worklist;
  $("alerts-panel").hidden = !me.panels.alerts;
  $("plots-panel").hidden = !me.panels.plots;
  $("plots").replaceChildren(...(me.panels.plots ? me.series : []).map((name) => {
    const plot = element("div", null, "plot");
    plot.id = `plot-${name}`;
    plot.dataset.series = name;
    return plot;
  }));
  await refresh(me);
  refreshTimer = setInterval(() => refresh(me), me.refresh_s * 1000);
}

// ------------------------------------------------------------------ panels

async function refresh(me) {
  const jobs = [];
  if (me.panels.worklist) jobs.push(api("/api/v1/dashboard/worklist").then(showWorklist));
  if (me.panels.alerts) jobs.push(api("/api/v1/alerts?open=false&limit=200").then(showAlerts));
  if (me.panels.plots) {
    const hours = $("hours").value;
    for (const name of me.series) {
      jobs.push(api(`/api/v1/dashboard/series/${encodeURIComponent(name)}?hours=${hours}`).then(showPlot));
    }
  }
  const failures = (await Promise.allSettled(jobs)).filter((job) => job.status === "rejected");
  if (failures.some((job) => job.reason.status === 401)) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The token is no longer valid: log in again.");
    return;
  }
  $("problem").hidden = failures.length === 0;
  $("problem").textContent = failures.map((job) => job.reason.message).join("; ");
  $("updated").textContent = `updated ${clock(new Date())}`;
}

function showWorklist(answer) {
  const now = parseTime(answer.at);
  const rows = answer.studies.map((study) => {
    const row = element("tr");
    row.dataset.studyUid = study.study_uid;
    row.dataset.accession = study.accession_number || "";
    row.append(element("td"));
    row.lastChild.append(element("span", study.priority, `badge ${study.priority}`));
    const deadline = parseTime(study.sla_deadline);
    const due = element("td", deadline ? untilText(deadline, now) : "none", deadline && deadline < now ? "overdue" : "");
    if (deadline) due.title = clock(deadline);
    row.append(due);
    row.append(element("td", study.accession_number || "—", "accession"));
    row.append(element("td", study.patient_name || "—"));
    row.append(element("td", [study.modality, study.body_part, study.study_description].filter(Boolean).join(" · ")));
    row.append(element("td", study.source_site));
    row.append(element("td", study.status));
    row.append(element("td", study.assigned_reader || "unassigned", study.assigned_reader ? "" : "muted"));
    row.append(aiCell(study));
    const reasons = element("td");
    const list = element("ul", null, "reasons");
    for (const reason of study.reasons || []) list.append(element("li", reason));
    reasons.append(list);
    row.append(reasons);
    return row;
  });
  if (!rows.length) rows.push(emptyRow(10, "No open studies."));
  $("worklist").tBodies[0].replaceChildren(...rows);
  $("worklist-count").textContent = `(${answer.studies.length} open)`;
}

function aiCell(study) {
  const cell = element("td", null, "ai");
  if (!("ai_flags" in study)) {
    cell.append(element("span", "not shown", "muted"));
    return cell;
  }
  for (const flag of study.ai_flags) {
    const badge = element("span", `${flag.label} ${flag.score.toFixed(2)}`, "flag");
    badge.title = `${flag.model} ${flag.model_version}`;
    cell.append(badge);
  }
  if (!study.ai_flags.length) cell.append(element("span", study.ai_status, "muted"));
  if (study.ai_reason) cell.append(element("div", study.ai_reason, "muted"));
  return cell;
}

function showAlerts(answer) {
  const now = new Date();
  const rows = answer.alerts.map((alert) => {
    const acknowledged = parseTime(alert.acknowledged_at);
    const deadline = parseTime(alert.ack_deadline);
    const row = element("tr", null, acknowledged ? "acknowledged" : "open");
    row.append(element("td", acknowledged ? "acknowledged" : "OPEN", acknowledged ? "" : "overdue"));
    row.append(element("td", alert.study_uid));
    row.append(element("td", alert.source_site));
    row.append(element("td", alert.finding));
    row.append(element("td", alert.escalation_level));
    row.append(element("td", deadline ? clock(deadline) : "—",
                       !acknowledged && deadline && deadline < now ? "overdue" : ""));
    row.append(element("td", acknowledged ? `${alert.acknowledged_by}, ${clock(acknowledged)}` : "—"));
    row.append(element("td", alert.message));
    return row;
  });
  if (!rows.length) rows.push(emptyRow(8, "No critical alerts."));
  $("alerts").tBodies[0].replaceChildren(...rows);
  const open = answer.alerts.filter((alert) => !alert.acknowledged_at).length;
  $("alerts-count").textContent = `(${open} open of ${answer.alerts.length})`;
}

function emptyRow(columns, text) {
  const row = element("tr");
  const cell = element("td", text, "empty");
  cell.colSpan = columns;
  row.append(cell);
  return row;
}

function showPlot(answer) {
  const plot = $(`plot-${answer.name}`);
  if (plot) Plotly.react(plot, answer.figure.data, answer.figure.layout, PLOT_CONFIG);
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", logOut);
  $("hours").addEventListener("change", () => {
    if (sessionStorage.getItem(TOKEN_KEY)) {
      clearInterval(refreshTimer);
      start();
    }
  });
  if (sessionStorage.getItem(TOKEN_KEY)) start();
  else showLogin(null);
});
