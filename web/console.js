// The console's page: three views on one address each (#/ the workflows, #/workflow/ID one of them, #/dead-letters),
// kept up to date by the server's events (/api/events: what the monitor read). No build step, no library.
"use strict";

const $ = (selector) => document.querySelector(selector);
let config = null, snapshot = null, lastRead = -1, busy = false, drawing = false, drawnAt = 0, seen = -1, changedAt = 0;
const SLOW_VIEW_MS = 3000;  // one workflow's view reads every topic: drawn again at most this often
let said = {};  // the last answer shown in a view ({where, text, refused}): kept when the view is drawn again

function escape(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function clock(value) {  // an ISO time or epoch seconds, shown in the viewer's zone
  if (value === null || value === undefined) return "–";
  const at = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return at.toLocaleTimeString([], {hour12: false}) + "." + String(at.getMilliseconds()).padStart(3, "0");
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function drawFlow() {  // each workflow's lane: who starts it, the orchestrator, each step's topic and service
  if (!config || !snapshot) return;
  const rate = (topic) => `<small>${(snapshot.rates[topic] ?? 0).toFixed(1)}/s</small>`;
  const lag = (group) => typeof snapshot.lag === "string" ? "" :
    `<small>lag ${snapshot.lag[group] ?? "–"}</small>`;
  $("#flow").innerHTML = config.flow.map((w) => `<div class="lane" data-workflow="${escape(w.name)}"><b>${escape(w.name)}</b>
      <span class="box">${escape(w.source)}</span>→<span class="box topic">message_stream ${rate("message_stream")}</span>→
      <span class="box">orchestrator ${lag("orchestrator")}</span>→
      ${w.steps.filter((s) => !s.follows).map((s) => `<span class="box topic">${escape(s.topic)} ${rate(s.topic)}</span>→<span class="box">${escape(s.service)}
        ${lag(s.service)}</span>`).join(" · ")}${w.steps.some((s) => s.follows) ? ` <small>then ${w.steps.filter((s) => s.follows)
        .map((s) => `${escape(s.name)} (after ${escape(s.follows)})`).join(", ")}</small>` : ""}</div>`).join("") +
    (typeof snapshot.lag === "string" ? `<div class="lane">consumer lag: ${escape(snapshot.lag)}</div>` : "");
}

function answer(where, text, refused) {  // an answer in the view, kept as the view is drawn again
  if (text !== undefined) said = {where, text, refused};
  const shown = $("#answer");
  if (!shown || said.where !== where) return;
  shown.hidden = false;
  shown.textContent = said.text;
  shown.className = "answer" + (said.refused ? " refused" : "");
}

function stateOf(row) {
  return row.stuck ? `<span class="state stuck" title="${escape(row.stuck.why)}">stuck</span>` :
    `<span class="state ${escape(row.state)}">${escape(row.state.replace("_", "-"))}</span>`;
}

function stepsOf(row) {
  if (row.state === "dead_lettered") return "<small>its event is a dead letter: see Dead letters</small>";
  if (row.state === "waiting") {
    return `<small>${row.stuck ? escape(row.stuck.why) : "its event waits in Kafka until an orchestrator routes it"}</small>`;
  }
  return row.steps.map((s) => `<span class="step">${escape(s.name)} <span class="${escape(s.state)}">${escape(s.state)}${
    s.late.length && s.state !== "done" ? " · " + escape(s.late.at(-1).meaning) : ""}</span>
    <small>×${escape(s.attempts)} sent ${clock(s.sent_at)}${s.deadline ? " due " + clock(s.deadline) : ""}</small></span>`).join("") || "–";
}

const STATES = ["", "waiting", "running", "completed", "failed", "cancelled", "stuck", "dead_lettered"];

function listed(params, changes) {  // the list's address with some of its filter changed (and back to page 1)
  const next = new URLSearchParams(params);
  for (const [name, value] of Object.entries(changes)) value ? next.set(name, value) : next.delete(name);
  if (!("page" in changes)) next.delete("page");
  return "#/" + (next.toString() ? "?" + next : "");
}

async function showWorkflows(params) {
  const found = await api("/api/workflows?" + params);
  const rows = found.rows, state = params.get("state") || "";
  const totals = snapshot ? snapshot.figures.workflows : {};
  const filters = STATES.map((s) => `<a href="${listed(params, {state: s})}" class="${s === state ? "on" : ""}">${
    s ? s.replace("_", "-") : "all"}</a>`).join("");
  const filtered = [...params.keys()].some((k) => k !== "page");
  const bulkWhy = config.actions_off || (found.actionable ? "" : "nothing the orchestrator holds to act on");
  const types = ["", ...config.workflows].map((t) => `<option ${t === (params.get("type") || "") ? "selected" : ""}>${escape(t)}</option>`);
  const local = (name) => {  // (a time of the address, ISO or epoch seconds, as the viewer's clock shows it)
    const said = params.get(name), at = /^\d+(\.\d+)?$/.test(said || "") ? new Date(Number(said) * 1000) : new Date(said);
    return said && !isNaN(at) ? new Date(at - at.getTimezoneOffset() * 60000).toISOString().slice(0, 19) : "";
  };
  $("#view").innerHTML = `<p class="counts">${Object.entries(totals).map(([k, v]) => `<span>${escape(k)} ${escape(v)}</span>`).join("")}</p>
    <p class="filters">${filters}</p>
    <form id="search" class="filters">
      <input name="id" placeholder="id begins" size="12" value="${escape(params.get("id") || "")}">
      <select name="type" title="workflow type">${types.join("")}</select>
      <input name="entity" placeholder="sensor, zone or unit" size="16" value="${escape(params.get("entity") || "")}">
      <label>from <input name="since" type="datetime-local" step="1" value="${local("since")}"></label>
      <label>to <input name="until" type="datetime-local" step="1" value="${local("until")}"></label>
      <button>Find</button> <a href="#/">clear</a></form>
    <p class="pages">${found.total} workflow${found.total === 1 ? "" : "s"}${found.reading ? " (still reading the topics)" : ""} ·
      page ${found.page} of ${found.pages}
      ${found.page > 1 ? `<a href="${listed(params, {page: found.page - 1})}">newer</a>` : ""}
      ${found.page < found.pages ? `<a href="${listed(params, {page: found.page + 1})}">older</a>` : ""}
      ${filtered ? `<button id="bulk-cancel" ${bulkWhy ? "disabled" : ""} title="${escape(bulkWhy)}">Cancel all ${found.actionable}…</button>
        <button id="bulk-retry" ${bulkWhy ? "disabled" : ""} title="${escape(bulkWhy)}">Retry all ${found.actionable}…</button>` : ""}</p>
    <p id="answer" class="answer" hidden></p>
    <table id="workflows"><thead><tr><th>workflow</th><th>type</th><th>state</th><th>started</th><th>steps</th></tr></thead>
    <tbody>${rows.map((r) => `<tr data-id="${escape(r.workflow_id)}"><td class="id"><a href="#/workflow/${escape(r.workflow_id)}">
      ${escape(r.workflow_id.slice(0, 8))}</a></td><td>${escape(r.type)}</td><td>${stateOf(r)}</td><td>${clock(r.started_at)}</td>
      <td>${stepsOf(r)}</td></tr>`).join("")}</tbody></table>
    ${rows.length ? "" : "<p>No workflow" + (filtered ? " matches." : " yet.") + "</p>"}`;
  answer("list:" + params);  // (an answer to a bulk action shows with the filter it was made with)
  $("#search").onsubmit = (event) => {
    event.preventDefault();
    const asked = Object.fromEntries(new FormData(event.target));
    for (const name of ["since", "until"]) if (asked[name]) asked[name] = new Date(asked[name]).toISOString();
    location.hash = listed(params, asked);
  };
  if (filtered) {
    $("#bulk-cancel").onclick = () => bulk("cancel", params);
    $("#bulk-retry").onclick = () => bulk("retry", params);
  }
}

async function bulk(kind, params) {  // a cancel or retry of every workflow the filter finds: counted, asked once, sent
  busy = true;
  const post = (body) => ({method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  try {
    const filter = Object.fromEntries([...params].filter(([name]) => !["page", "per_page"].includes(name)));
    const counted = await api("/api/bulk/" + kind, post({filter}));
    const asked = await ask(`${kind === "cancel" ? "Cancel" : "Retry"} ${counted.count} workflows?`,
      `One request each; the orchestrator answers each (one ${kind === "cancel" ? "not running" : "not failed"} is refused, with why).`);
    if (!asked) return;
    const reply = await api("/api/bulk/" + kind, post({filter, count: counted.count, found: counted.found, ...asked}));
    const refused = reply.answers.filter((a) => !a.granted).map((a) => a.answer);
    answer("list:" + params, `${kind}: ${reply.granted} of ${reply.count} granted` + (refused.length ? "; " + refused.slice(0, 5).join("; ") +
      (refused.length > 5 ? ` (and ${refused.length - 5} more)` : "") : ""), refused.length > 0);
  } catch (error) {
    answer("list:" + params, error.message, true);
  } finally {
    busy = false;
  }
}

async function showWorkflow(id) {
  const w = await api("/api/workflows/" + encodeURIComponent(id));
  const off = config.actions_off;
  const cancelWhy = off || (w.state !== "running" ? `only a running workflow can be cancelled (this one is ${w.state})` : "");
  const retryWhy = off || (w.state !== "failed" ? `only a failed workflow can be retried (this one is ${w.state})` :
    w.retry_refused || "");
  $("#view").innerHTML = `<h2>${escape(w.type)} workflow <span class="id">${escape(w.workflow_id)}</span>
      <span class="state ${escape(w.state)}" id="state">${escape(w.state)}</span></h2>
    <p>${w.state === "waiting" ? "its event waits in Kafka: the orchestrator has not routed it (yet)" :
      `started ${clock(w.started_at)} under example ${escape(w.stage)}`}${w.finished_at ? ", ended " + clock(w.finished_at) : ""}${
      w.retries ? `, retried ${Number(w.retries)}×` : ""}${w.trace ? ` · <a href="${escape(w.trace)}" target="_blank">its trace in Zipkin</a>` : ""}</p>
    <p><button id="cancel" ${cancelWhy ? "disabled" : ""} title="${escape(cancelWhy)}">Cancel…</button>
      <button id="retry" ${retryWhy ? "disabled" : ""} title="${escape(retryWhy)}">Retry…</button>
      <small>${escape(off || "")}</small></p>
    <p id="answer" class="answer" hidden></p>
    <h3>Steps, in the order they were sent</h3><table id="steps"><thead><tr><th>step</th><th>follows</th><th>state</th><th>attempts</th><th>sent</th>
      <th>answered</th><th>deadline</th></tr></thead>
    <tbody>${w.steps.map((s) => `<tr><td>${escape(s.name)}</td><td>${escape(s.follows || "the start")}</td>
      <td class="${escape(s.state)}">${escape(s.state)}${s.late.map((l) => `<br><small class="late">then ${clock(l.at)}:
        ${escape(l.type)} (${escape(l.meaning)})</small>`).join("")}</td><td>${escape(s.attempts)}</td>
      <td>${clock(s.sent_at)}</td><td>${s.state === "sent" ? "–" : clock(s.finished_at)}</td><td>${clock(s.deadline)}</td></tr>`).join("")}</tbody></table>
    <h3>Its messages, in the order Kafka got them</h3>
    <table id="messages"><thead><tr><th>time</th><th>topic</th><th>type</th><th>from</th><th>what it says</th></tr></thead>
    <tbody>${w.messages.map((m) => `<tr><td>${clock(m.at / 1000)}</td><td>${escape(m.topic)}</td><td>${escape(m.type)}</td>
      <td>${escape(m.source)}</td><td>${escape(m.note)}<span class="repeat">${m.repeat ? "repeat (same id again)" : ""}</span></td>
      </tr>`).join("")}</tbody></table>
    <h3>Its state entry</h3><pre>${w.entry ? escape(JSON.stringify(w.entry, null, 2)) : "(none: the orchestrator keeps none until it routes the workflow)"}</pre>`;
  answer(w.workflow_id);
  $("#cancel").onclick = () => act(w.workflow_id, "cancel");
  $("#retry").onclick = () => act(w.workflow_id, "retry");
}

function ask(title, text) {  // a confirmation with a reason: {reason, by}, or null if the person went back
  $("#ask-title").textContent = title;
  $("#ask-text").textContent = text;
  $("#ask-reason").value = "";
  $("#ask-by").value = config.signed_in || localStorage.getItem("console-by") || "";
  $("#ask-by").disabled = Boolean(config.signed_in);  // (signed in: the console acts as that name)
  const dialog = $("#ask");
  return new Promise((resolve) => {
    dialog.onclose = () => {
      if (dialog.returnValue !== "go") return resolve(null);
      if (!config.signed_in) localStorage.setItem("console-by", $("#ask-by").value);
      resolve({reason: $("#ask-reason").value, by: $("#ask-by").value || "console"});
    };
    dialog.showModal();
  });
}

async function act(id, kind) {
  busy = true;
  try {
    const asked = await ask(`${kind === "cancel" ? "Cancel" : "Retry"} workflow ${id.slice(0, 8)}?`, kind === "cancel" ?
      "It ends cancelled: its pending steps are no longer awaited, nothing is tried again, and no service acts on " +
      "its commands after this." :
      "Its failed step's command is sent again under a new id, and the workflow runs again.");
    if (!asked) return;
    answer(id, "asking the orchestrator…", false);
    try {
      const reply = await api(`/api/workflows/${encodeURIComponent(id)}/${kind}`, {method: "POST",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify(asked)});
      answer(id, reply.answer, !reply.granted);
    } catch (error) {
      answer(id, error.message, true);
    }
  } finally {
    busy = false;
  }
}

async function showDeadLetters() {
  const letters = await api("/api/dead-letters");
  $("#view").innerHTML = `<h2>Dead letters (${letters.length})</h2>
    <table id="letters"><thead><tr><th>time</th><th>letter</th><th>workflow</th><th>from</th><th>replayed</th><th>reason</th><th></th></tr></thead>
    <tbody>${letters.map((l) => `<tr data-letter="${escape(l.letter)}"><td>${clock(l.at)}</td><td>${escape(l.letter)}</td>
      <td>${l.workflow === "-" ? "–" : `<a href="#/workflow/${escape(l.workflow)}">${escape(l.workflow)}</a>`}</td>
      <td>${escape(l.from)}</td><td>${l.replayed.length ? `${l.replayed.length}×, last ${clock(l.replayed.at(-1))}` : "–"}</td>
      <td>${escape(l.reason)}</td><td><button class="replay" ${config.replay_off ? "disabled" : ""}
        title="${escape(config.replay_off || "")}">Replay…</button></td></tr>`).join("")}</tbody></table>
    <p id="answer" class="answer" hidden></p>`;
  answer("dead-letters");
  document.querySelectorAll("button.replay").forEach((button) => button.onclick = () =>
    replay(button.closest("tr").dataset.letter));
}

async function replay(letter) {
  busy = true;
  try {
    if (!await ask(`Replay ${letter}?`, "Its original is sent again to the topic it came from (same id: handled once).")) return;
    try {
      const reply = await api("/api/dead-letters/replay", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({letter})});
      answer("dead-letters", reply.replayed ? `replayed ${letter}` : `${letter} was not replayed (see the console's log)`,
             !reply.replayed);
    } catch (error) {
      answer("dead-letters", error.message, true);
    }
  } finally {
    busy = false;
  }
}

async function show() {  // the view the address names
  const route = location.hash.replace(/^#\/?/, "").split("/");
  drawnAt = Date.now();
  try {
    if (route[0] === "workflow" && route[1]) await showWorkflow(decodeURIComponent(route[1]));
    else if (route[0] === "dead-letters") await showDeadLetters();
    else await showWorkflows(route[0] === "state" ? new URLSearchParams({state: route[1]}) :
      new URLSearchParams(location.hash.includes("?") ? location.hash.slice(location.hash.indexOf("?") + 1) : ""));
  } catch (error) {
    $("#view").innerHTML = `<p class="problem">${escape(error.message)}</p>`;
  }
}

async function start() {
  config = await api("/api/config");
  window.addEventListener("hashchange", show);
  await show();
  const events = new EventSource("/api/events");
  events.onmessage = async (event) => {
    snapshot = JSON.parse(event.data);
    $("#live").textContent = (snapshot.problem ? "old · as of " : "live · ") +
      new Date(snapshot.problem ? snapshot.answered_at * 1000 : Date.now()).toLocaleTimeString([], {hour12: false});
    $("#live").classList.toggle("old", Boolean(snapshot.problem));
    $("#problem").hidden = !snapshot.problem;
    $("#problem").textContent = snapshot.problem || "";
    drawFlow();
    if (snapshot.read !== seen) [seen, changedAt] = [snapshot.read, Date.now()];
    const slow = location.hash.startsWith("#/workflow/") || location.hash.startsWith("#/dead-letters");
    // (drawn again when the topics said something new, and once more 2 s after: the state a view shows may become
    // visible a moment after the messages that told of it)
    const settled = drawnAt < changedAt + 2000 && Date.now() >= changedAt + 2000;
    const typing = document.activeElement && document.activeElement.closest("#search");  // (not redrawn under a hand)
    if ((snapshot.read !== lastRead || settled) && !busy && !drawing && !typing && !$("#ask").open &&
        (!slow || Date.now() - drawnAt > SLOW_VIEW_MS)) {
      lastRead = snapshot.read;
      drawing = true;  // (one drawing at a time: a slow one is not asked for again meanwhile)
      try { await show(); } finally { drawing = false; }
    }
  };
  events.onerror = () => { $("#live").textContent = "reconnecting…"; };
}

start();
