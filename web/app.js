// The live event page. It opens live: without saved subscriptions in its URL it subscribes to
// every event the visitor may see and says so. The builder (builder.js) adds subscriptions,
// which are kept in the URL (`?sub=...`) so a view can be bookmarked and shared; the feed is
// bounded, with pause and search, severity colours and an events-per-second chart (chart.js);
// details show a before/after diff; replays play into their own list; the entity view
// (entity.js) shows an entity's current rows. All times are UTC. Everything goes through
// /client.js; a refused or missing token stops reconnecting and asks for one.

import { connect, State } from "/client.js";
import { builtSpec, describe, entityMeta, fillBuilder, restoreBuilder, specsFrom } from "/builder.js";
import { rateChart } from "/chart.js";
import { showEntity } from "/entity.js";

const $ = (id) => document.getElementById(id);
const FEED_LIMIT = 500;
const REPLAY_LIMIT = 5000;
const EVERYTHING = { filter: { type: "*" } };

const params = new URLSearchParams(location.search);
const tokenInput = $("token");
// An old link may carry `?token=`: use it, but keep it out of the address bar and history.
tokenInput.value = params.get("token") ?? localStorage.getItem("rowcast.token") ?? "";
params.delete("token");
tokenInput.addEventListener("change", () => {
  localStorage.setItem("rowcast.token", tokenInput.value.trim());
  // Refused so far: try the new token in place. Connected: start afresh with it.
  if (client.state !== State.UNAUTHORIZED) return location.reload();
  $("auth").hidden = true;
  client.reconnect();
  loadMetadata();
});
const token = () => tokenInput.value.trim() || undefined;
const headers = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/events`;
const indicator = $("connection");
const client = connect(wsUrl, {
  token,
  onState: (state, detail) => {
    indicator.dataset.state = state;
    indicator.textContent = state === State.UNAUTHORIZED ? "token required" : state;
    indicator.title = detail ?? "";
    if (state === State.UNAUTHORIZED) tokenRequired(detail);
    if (state === State.OPEN) {
      $("auth").hidden = true;
      loadMetadata();
    }
  },
  onError: (frame) => toast(`${frame.code}: ${frame.message}`, "warning"),
  onReset: (_filter, oldest) => toast(`resuming from event ${oldest}: the log no longer holds what came before`, "warning"),
  onRefused: (_filter, message) => toast(`subscription refused: ${message}`, "error"),
});

function tokenRequired(why) {
  indicator.dataset.state = State.UNAUTHORIZED;
  indicator.textContent = "token required";
  $("auth-why").textContent = why === "token refused" ? "The server refused this token." : "This server wants a token.";
  $("auth").hidden = false;
  tokenInput.focus();
}

// ---- metadata and the builder ----------------------------------------------------------------

let metadata = null;
let loading = false;
async function loadMetadata() {
  if (metadata || loading) return;
  loading = true;
  try {
    const response = await fetch("/api/events/metadata", { headers: headers() });
    if (response.status === 401) return tokenRequired(token() ? "token refused" : "token required");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    metadata = await response.json();
  } catch (err) {
    toast(`metadata: ${err.message}`, "warning");
    return;
  } finally {
    loading = false;
  }
  fillBuilder(metadata);
  const last = subscriptions.findLast((s) => !s.implicit);
  if (last) restoreBuilder(last.spec);
  const views = $("entity-view");
  views.append(...metadata.entities.filter((e) => e.table).map((e) => new Option(e.name, e.name)));
  if (params.get("view")) {
    views.value = params.get("view");
    openEntity();
  }
}
loadMetadata();

// ---- subscriptions, kept in the URL ----------------------------------------------------------

const subscriptions = [];

$("subscribe").addEventListener("click", () => {
  // The "everything" subscription a visit starts with gives way to the first one built.
  const implicit = subscriptions.filter((s) => s.implicit);
  addSubscription(builtSpec());
  for (const entry of implicit) removeSubscription(entry);
});

function saveUrl() {
  const query = new URLSearchParams();
  for (const entry of subscriptions) if (!entry.implicit) query.append("sub", JSON.stringify(entry.spec));
  if ($("entity-view").value) query.set("view", $("entity-view").value);
  const tab = document.querySelector('[role="tab"][aria-selected="true"]')?.dataset.tab;
  if (tab && tab !== "live") query.set("tab", tab);
  history.replaceState(null, "", `${location.pathname}${query.size ? `?${query}` : ""}`);
  const everything = subscriptions.length === 1 && subscriptions[0].implicit;
  $("notice").textContent = everything ? "showing all events you may see" : "";
}

function addSubscription(spec, implicit = false) {
  const card = document.createElement("div");
  card.className = "card";
  const text = document.createElement("span");
  text.className = "what";
  text.textContent = implicit ? "everything you may see" : describe(spec);
  const count = document.createElement("span");
  count.className = "count";
  count.textContent = "0";
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Unsubscribe";
  card.append(text, count, remove);
  $("cards").append(card);
  let received = 0;
  const entry = { spec, card, implicit };
  entry.stop = client.subscribe(
    spec.filter,
    (event) => {
      received += 1;
      count.textContent = String(received);
      show(event);
    },
    { history: spec.history },
  );
  remove.addEventListener("click", () => removeSubscription(entry));
  subscriptions.push(entry);
  saveUrl();
}

function removeSubscription(entry) {
  entry.stop();
  entry.card.remove();
  subscriptions.splice(subscriptions.indexOf(entry), 1);
  saveUrl();
}

const saved = specsFrom(params);
if (saved.length) for (const spec of saved) addSubscription(spec);
else addSubscription(EVERYTHING, true);

// ---- tabs ------------------------------------------------------------------------------------

const tabs = [...document.querySelectorAll('[role="tab"]')];
function selectTab(name) {
  for (const tab of tabs) {
    const on = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(on));
    $(`tab-${tab.dataset.tab}`).hidden = !on;
  }
  saveUrl();
}
for (const tab of tabs) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
if (tabs.some((t) => t.dataset.tab === params.get("tab"))) selectTab(params.get("tab"));

// ---- the live feed ---------------------------------------------------------------------------

const feed = $("feed");
const seen = new Set();
const countRate = rateChart($("rate-chart"), $("rate"));
let paused = false;
let buffered = [];
let total = 0;

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(paused));
  if (!paused) {
    for (const event of buffered) render(event);
    buffered = [];
  }
  counts();
});
$("clear").addEventListener("click", () => {
  feed.replaceChildren();
  seen.clear();
  buffered = [];
  total = 0;
  counts();
});
$("search").addEventListener("input", () => {
  for (const item of feed.children) applySearch(item);
});

function show(event) {
  // Several subscriptions may deliver one event; the feed shows it once.
  if (seen.has(event.id)) return;
  seen.add(event.id);
  countRate();
  if (event.severity === "error" || event.severity === "critical") {
    toast(`${event.type} in ${event.organization_id ?? "-"}/${event.domain_id ?? "-"}`, "error");
  }
  if (paused) {
    buffered.push(event);
    // Only the newest FEED_LIMIT would be shown anyway.
    if (buffered.length > FEED_LIMIT) seen.delete(buffered.shift().id);
    counts();
    return;
  }
  render(event);
}

function item(event) {
  const li = document.createElement("li");
  li.className = `event ${event.severity}`;
  li.dataset.id = event.id;
  li.dataset.type = event.type;
  li.dataset.search = JSON.stringify(event).toLowerCase();
  for (const [name, text] of [
    ["id", `#${event.id}`],
    ["sev", event.severity],
    ["type", event.type],
    ["scope", `${event.organization_id ?? "–"} / ${event.domain_id ?? "–"}`],
    ["time", event.timestamp.slice(11, 23)],
  ]) {
    const span = document.createElement("span");
    span.className = name;
    span.textContent = text;
    li.append(span);
  }
  li.title = `${event.timestamp} (UTC)`;
  li.addEventListener("click", () => details(event, li));
  return li;
}

function render(event) {
  const li = item(event);
  applySearch(li);
  feed.prepend(li);
  while (feed.children.length > FEED_LIMIT) {
    seen.delete(Number(feed.lastElementChild.dataset.id));
    feed.lastElementChild.remove();
  }
  total += 1;
  counts();
}

function applySearch(li) {
  const query = $("search").value.trim().toLowerCase();
  li.hidden = query !== "" && !li.dataset.search.includes(query);
}

function counts() {
  $("counts").textContent = `${total} events${paused ? ` (paused, ${buffered.length} waiting)` : ""}`;
}

// ---- details ---------------------------------------------------------------------------------

function details(event, li) {
  for (const other of document.querySelectorAll(".events .selected, #rows .selected")) other.classList.remove("selected");
  li?.classList.add("selected");
  $("detail-empty").hidden = true;
  $("detail-json").textContent = JSON.stringify(event, null, 2);
  const diff = $("diff");
  diff.replaceChildren();
  if (event.old && event.data && event.changed?.length) {
    const table = document.createElement("table");
    table.className = "diff";
    table.innerHTML = '<thead><tr><th scope="col">column</th><th scope="col">before</th><th scope="col">after</th></tr></thead>';
    const body = document.createElement("tbody");
    for (const column of event.changed) {
      const row = document.createElement("tr");
      for (const text of [column, JSON.stringify(event.old[column]), JSON.stringify(event.data[column])]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      body.append(row);
    }
    table.append(body);
    diff.append(table);
  }
}

// ---- toasts ----------------------------------------------------------------------------------

function toast(text, kind) {
  const note = document.createElement("div");
  note.className = `toast ${kind}`;
  note.textContent = text;
  $("toasts").append(note);
  setTimeout(() => note.remove(), 6000);
  while ($("toasts").children.length > 5) $("toasts").firstElementChild.remove();
}

// ---- replay: its own list, oldest first --------------------------------------------------------

// `datetime-local` has no zone: the page reads and writes it as UTC, like the feed's times.
const utcInput = (date) => date.toISOString().slice(0, 19);
$("replay-from").value = utcInput(new Date(Date.now() - 15 * 60000));
$("replay-to").value = utcInput(new Date(Date.now() + 60000));
let running = null;

$("replay-start").addEventListener("click", () => {
  running?.stop();
  const from = new Date(`${$("replay-from").value}Z`);
  const to = new Date(`${$("replay-to").value}Z`);
  if (Number.isNaN(from.getTime()) || Number.isNaN(to.getTime())) return toast("replay: pick both times", "warning");
  const speed = Number($("replay-speed").value) || 1;
  const filter = subscriptions[0]?.spec.filter ?? {};
  const list = $("replay-feed");
  const progress = $("replay-progress");
  const status = $("replay-status");
  list.replaceChildren();
  progress.value = 0;
  delete status.dataset.done;
  status.textContent = "starting…";
  $("replay-stop").disabled = false;
  running = client.replay({ filter, from, to, speed }, {
    onStarted: (count) => {
      progress.max = Math.max(count, 1);
      status.textContent = `0 / ${count}`;
    },
    onEvent: (event) => {
      list.append(item(event));
      if (list.children.length > REPLAY_LIMIT) list.firstElementChild.remove();
    },
    onProgress: (sent, count) => {
      progress.value = sent;
      status.textContent = `${sent} / ${count}`;
    },
    onFinished: (sent, stopped) => {
      if (!stopped) progress.value = progress.max;
      status.textContent = stopped ? "stopped" : `finished: ${sent} events`;
      status.dataset.done = "true";
      $("replay-stop").disabled = true;
    },
    onError: (message) => {
      status.textContent = `failed: ${message}`;
      $("replay-stop").disabled = true;
    },
  });
});
$("replay-stop").addEventListener("click", () => running?.stop());

// ---- entity view -----------------------------------------------------------------------------

function openEntity() {
  saveUrl();
  showEntity($("entity-view").value, {
    client,
    headers,
    meta: entityMeta,
    onUnauthorized: () => tokenRequired(token() ? "token refused" : "token required"),
    onDetails: (row) => details({ data: row }, null),
  });
}
$("entity-view").addEventListener("change", openEntity);

// For the console and the browser test.
window.rowcast = client;
window.rowcastPage = { builtSpec, subscriptions };
