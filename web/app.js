// The live event page: a subscription builder fed by /api/events/metadata, subscription
// cards, a bounded live feed with pause and search, event details with a before/after diff,
// toasts for `error` events, and a replay panel. Everything goes through /client.js.

import { connect, State } from "/client.js";

const $ = (id) => document.getElementById(id);
const FEED_LIMIT = 500;

const params = new URLSearchParams(location.search);
const tokenInput = $("token");
tokenInput.value = params.get("token") ?? localStorage.getItem("rowcast.token") ?? "";
tokenInput.addEventListener("change", () => {
  localStorage.setItem("rowcast.token", tokenInput.value.trim());
  // The input wins from now on; keep the token out of the address bar and history.
  params.delete("token");
  history.replaceState(null, "", `${location.pathname}${params.size ? `?${params}` : ""}`);
  location.reload();
});
const token = () => tokenInput.value.trim() || undefined;

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/events`;
const indicator = $("connection");
const client = connect(wsUrl, {
  token,
  onState: (state, detail) => {
    indicator.dataset.state = state;
    indicator.textContent = state;
    indicator.title = detail ?? "";
    if (state === State.OPEN) loadMetadata();
  },
  onError: (frame) => toast(`${frame.code}: ${frame.message}`, "warning"),
  onReset: (_filter, oldest) => toast(`resuming from event ${oldest}: the log no longer holds what came before`, "warning"),
  onRefused: (filter, message) => toast(`subscription refused: ${message}`, "error"),
});

// ---- builder -------------------------------------------------------------------------------

let metadataLoaded = false;
async function loadMetadata() {
  if (metadataLoaded) return;
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  let metadata;
  try {
    const response = await fetch("/api/events/metadata", { headers });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    metadata = await response.json();
  } catch (err) {
    toast(`metadata: ${err.message}`, "warning");
    return;
  }
  metadataLoaded = true;
  const entities = $("entities");
  entities.replaceChildren();
  for (const entity of metadata.entities) {
    const box = document.createElement("fieldset");
    const legend = document.createElement("legend");
    const all = checkbox(`${entity.name}.*`, entity.name, "entity");
    legend.append(all);
    box.append(legend);
    for (const type of entity.event_types) {
      box.append(checkbox(type, type.split(".")[1], "type"));
    }
    entities.append(box);
  }
  fill($("organizations"), metadata.organizations.map((o) => [o, o || "(empty)"]));
  fill($("domains"), metadata.domains.map((d) => [d.id, `${d.id || "(empty)"} · ${d.organization_id}`]));
}

function checkbox(value, text, kind) {
  const label = document.createElement("label");
  const input = document.createElement("input");
  input.type = "checkbox";
  input.value = value;
  input.dataset.kind = kind;
  label.append(input, ` ${text}`);
  return label;
}

function fill(select, options) {
  select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
}

function selected(select) {
  return [...select.selectedOptions].map((o) => o.value);
}

function builtFilter() {
  const types = [...document.querySelectorAll("#entities input:checked")].map((i) => i.value);
  const filter = {};
  if (types.length) filter.type = types;
  const orgs = selected($("organizations"));
  if (orgs.length) filter.organization_id = orgs;
  const domains = selected($("domains"));
  if (domains.length) filter.domain_id = domains;
  if ($("severity").value !== "debug") filter.severity = $("severity").value;
  return filter;
}

// ---- subscriptions -------------------------------------------------------------------------

const subscriptions = [];

$("subscribe").addEventListener("click", () => addSubscription(builtFilter()));

function describe(filter) {
  const parts = [];
  parts.push(filter.type ? filter.type.join(", ") : "every type");
  if (filter.organization_id) parts.push(`org ${filter.organization_id.join(", ")}`);
  if (filter.domain_id) parts.push(`domain ${filter.domain_id.join(", ")}`);
  if (filter.severity) parts.push(`≥ ${filter.severity}`);
  return parts.join(" · ");
}

function addSubscription(filter) {
  const card = document.createElement("div");
  card.className = "card";
  const text = document.createElement("span");
  text.textContent = describe(filter);
  const count = document.createElement("span");
  count.className = "count";
  count.textContent = "0";
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Unsubscribe";
  card.append(text, count, remove);
  $("cards").append(card);
  let received = 0;
  const entry = { filter, card };
  entry.stop = client.subscribe(filter, (event) => {
    received += 1;
    count.textContent = String(received);
    show(event, false);
  });
  remove.addEventListener("click", () => {
    entry.stop();
    card.remove();
    subscriptions.splice(subscriptions.indexOf(entry), 1);
  });
  subscriptions.push(entry);
}

// ---- feed ----------------------------------------------------------------------------------

const feed = $("feed");
const seen = new Set();
let paused = false;
let buffered = [];
let total = 0;

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(paused));
  if (!paused) {
    for (const [event, replayed] of buffered) render(event, replayed);
    buffered = [];
  }
});
$("clear").addEventListener("click", () => {
  feed.replaceChildren();
  seen.clear();
  total = 0;
  counts();
});
$("search").addEventListener("input", () => {
  for (const item of feed.children) applySearch(item);
});

function show(event, replayed) {
  const key = `${replayed ? "r" : "l"}${event.id}`;
  // Several subscriptions may deliver one event; the feed shows it once.
  if (seen.has(key)) return;
  seen.add(key);
  if ((event.severity === "error" || event.severity === "critical") && !replayed) {
    toast(`${event.type} in ${event.organization_id ?? "-"}/${event.domain_id ?? "-"}`, "error");
  }
  if (paused) {
    buffered.push([event, replayed]);
    // Only the newest FEED_LIMIT would be shown anyway.
    if (buffered.length > FEED_LIMIT) {
      const [dropped, wasReplay] = buffered.shift();
      seen.delete(`${wasReplay ? "r" : "l"}${dropped.id}`);
    }
    return;
  }
  render(event, replayed);
}

function render(event, replayed) {
  const item = document.createElement("li");
  item.className = `event ${event.severity}${replayed ? " replayed" : ""}`;
  item.dataset.id = event.id;
  item.dataset.key = `${replayed ? "r" : "l"}${event.id}`;
  item.dataset.type = event.type;
  item.dataset.search = JSON.stringify(event).toLowerCase();
  const time = event.timestamp.slice(11, 23);
  item.innerHTML = `<span class="id"></span><span class="type"></span><span class="scope"></span><span class="time"></span>`;
  item.querySelector(".id").textContent = `#${event.id}`;
  item.querySelector(".type").textContent = event.type + (replayed ? " (replay)" : "");
  item.querySelector(".scope").textContent = `${event.organization_id ?? "–"} / ${event.domain_id ?? "–"}`;
  item.querySelector(".time").textContent = time;
  item.addEventListener("click", () => details(event, item));
  applySearch(item);
  feed.prepend(item);
  while (feed.children.length > FEED_LIMIT) {
    const oldest = feed.lastElementChild;
    seen.delete(oldest.dataset.key);
    oldest.remove();
  }
  total += 1;
  counts();
}

function applySearch(item) {
  const query = $("search").value.trim().toLowerCase();
  item.hidden = query !== "" && !item.dataset.search.includes(query);
}

function counts() {
  $("counts").textContent = `${total} events${paused ? " (paused)" : ""}`;
}

function details(event, item) {
  for (const other of feed.querySelectorAll(".selected")) other.classList.remove("selected");
  item.classList.add("selected");
  $("detail-empty").hidden = true;
  $("detail-json").textContent = JSON.stringify(event, null, 2);
  const diff = $("diff");
  diff.replaceChildren();
  if (event.old && event.data && event.changed?.length) {
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>column</th><th>before</th><th>after</th></tr></thead>";
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

// ---- toasts --------------------------------------------------------------------------------

function toast(text, kind) {
  const note = document.createElement("div");
  note.className = `toast ${kind}`;
  note.textContent = text;
  $("toasts").append(note);
  setTimeout(() => note.remove(), 6000);
  while ($("toasts").children.length > 5) $("toasts").firstElementChild.remove();
}

// ---- replay --------------------------------------------------------------------------------

const local = (date) => new Date(date.getTime() - date.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
$("replay-from").value = local(new Date(Date.now() - 15 * 60000));
$("replay-to").value = local(new Date(Date.now() + 60000));
let running = null;

$("replay-start").addEventListener("click", () => {
  const from = new Date($("replay-from").value);
  const to = new Date($("replay-to").value);
  const speed = Number($("replay-speed").value) || 1;
  const filter = subscriptions[0]?.filter ?? {};
  const progress = $("replay-progress");
  const status = $("replay-status");
  progress.value = 0;
  status.textContent = "starting…";
  $("replay-stop").disabled = false;
  running = client.replay({ filter, from, to, speed }, {
    onStarted: (count) => {
      progress.max = Math.max(count, 1);
      status.textContent = `0 / ${count}`;
    },
    onEvent: (event) => show(event, true),
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

// Expose the client for debugging from the console.
window.rowcast = client;
