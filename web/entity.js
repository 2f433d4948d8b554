// The entity view: one entity's current rows as a table. Rows come from
// `GET /api/entities/{name}/rows`, whose `last_id` was read before the table, so subscribing to
// `<entity>.*` with `since: last_id` and applying the events converges to the table's rows:
// an event with `data` upserts by key (unless it is a `deleted`), `*.deleted` removes by the key
// of `old` (or `data`), `*.truncated` empties. A server without that endpoint gives a table
// built from the last 1000 events (`history`), or from live events only.

const $ = (id) => document.getElementById(id);
const ROWS_LIMIT = 500;
const HISTORY_FALLBACK = 1000;

let current = null;

/**
 * Shows entity `name` (or nothing for ""). `context`: `client`, `headers()`, `meta(name)`
 * (its metadata entry), `onUnauthorized()`, `onDetails(row)`.
 */
export async function showEntity(name, context) {
  current?.stop?.();
  const view = { name, key: ["id"], columns: [], rows: new Map(), stop: null, context };
  current = view;
  const status = $("entity-status");
  delete status.dataset.ready;
  $("rows").replaceChildren();
  if (!name) {
    status.textContent = "Pick an entity to see its current rows, kept live.";
    return;
  }
  const meta = context.meta(name);
  view.key = meta?.key ?? view.key;
  view.columns = (meta?.fields ?? []).map((f) => f.name);
  status.textContent = "loading…";
  let options;
  let how;
  try {
    const response = await fetch(`/api/entities/${encodeURIComponent(name)}/rows?limit=${ROWS_LIMIT}`, {
      headers: context.headers(),
    });
    if (response.status === 401) return context.onUnauthorized();
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.json();
    if (current !== view) return;
    view.key = body.key ?? view.key;
    for (const row of body.rows ?? []) upsert(view, row, false);
    options = { since: body.last_id };
    how = body.truncated ? `from the first ${ROWS_LIMIT} rows of ${body.table}` : `from ${body.table}`;
  } catch {
    options = { history: HISTORY_FALLBACK };
    how = `from the last ${HISTORY_FALLBACK} events (no rows endpoint on this server)`;
  }
  if (current !== view) return;
  header(view);
  const ready = (_lastId, history) => {
    if (current !== view) return;
    if (options.history && !history) how = "live changes only (this server has neither rows nor history)";
    status.dataset.ready = "true";
    summary(view, how);
  };
  view.stop = context.client.subscribe({ type: `${name}.*` }, (event) => apply(view, event, how), {
    ...options,
    onCaughtUp: ready,
  });
}

function summary(view, how) {
  if (current !== view) return;
  const status = $("entity-status");
  if (!status.dataset.ready) return;
  status.textContent = `${view.rows.size} rows · ${how}${how.startsWith("live") ? "" : " · live"}`;
}

function keyOf(view, row) {
  return JSON.stringify(view.key.map((k) => row?.[k] ?? null));
}

function cellText(value) {
  if (value === undefined) return "";
  if (value === null) return "null";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function apply(view, event, how) {
  if (current !== view || event.source?.kind === "app") return;
  const action = event.type.slice(event.type.indexOf(".") + 1);
  if (action === "truncated") {
    view.rows.clear();
    $("rows").querySelector("tbody")?.replaceChildren();
  } else if (action === "deleted") {
    const key = keyOf(view, event.old ?? event.data);
    view.rows.get(key)?.tr.remove();
    view.rows.delete(key);
  } else if (event.data) {
    upsert(view, event.data, true);
  }
  summary(view, how);
}

function header(view) {
  const table = $("rows");
  table.replaceChildren();
  const head = document.createElement("thead");
  const line = document.createElement("tr");
  for (const column of view.columns) {
    const th = document.createElement("th");
    th.textContent = column;
    th.scope = "col";
    line.append(th);
  }
  head.append(line);
  const body = document.createElement("tbody");
  for (const { tr } of view.rows.values()) body.append(tr);
  table.append(head, body);
}

function upsert(view, row, flash) {
  const fresh = Object.keys(row).filter((c) => !view.columns.includes(c));
  if (fresh.length) {
    // Columns known only from rows (no field list): the table grows to show them.
    view.columns.push(...fresh);
    for (const entry of view.rows.values()) fillRow(view, entry, entry.row, false);
    if ($("rows").tHead) header(view);
  }
  const key = keyOf(view, row);
  let entry = view.rows.get(key);
  if (!entry) {
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    tr.addEventListener("click", () => view.context.onDetails?.(entry.row));
    entry = { tr, row };
    view.rows.set(key, entry);
    $("rows").tBodies[0]?.append(tr);
    if (flash) blink(tr, "added");
  }
  fillRow(view, entry, row, flash);
}

function fillRow(view, entry, row, flash) {
  entry.row = row;
  const { tr } = entry;
  view.columns.forEach((column, at) => {
    let td = tr.children[at];
    if (!td) {
      td = document.createElement("td");
      td.dataset.col = column;
      tr.append(td);
    }
    const text = cellText(row[column]);
    if (td.textContent === text) return;
    td.textContent = text;
    td.classList.toggle("null", row[column] === null);
    if (flash && !tr.classList.contains("added")) blink(td, "changed");
  });
}

function blink(element, kind) {
  element.classList.add(kind);
  setTimeout(() => element.classList.remove(kind), 1600);
}
