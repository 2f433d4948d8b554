// The subscription builder: event types, organizations, domains, minimum severity, field
// filters (`where` predicates, SPEC §5) made from the metadata's fields, and a history count.
// A built subscription is a "spec": `{filter, history}`. Specs live in the page's URL (one
// `sub` parameter each, as JSON) so a view can be bookmarked and shared; the token never does.

const $ = (id) => document.getElementById(id);

/** Operators offered for a field without known values (`in`/`nin` take a comma list). */
const OPERATORS = ["eq", "neq", "lt", "lte", "gt", "gte", "contains", "in", "nin", "is_null", "changed"];
const NUMERIC = /^(smallint|integer|bigint|int[248]?|numeric|decimal|real|double precision|float[48]?)\b/;

let metadata = null;

/** Fills the builder from `/api/events/metadata`. */
export function fillBuilder(meta) {
  metadata = meta;
  const entities = $("entities");
  entities.replaceChildren();
  // One folded box per entity: its checkbox means every action; unfold to pick some.
  for (const entity of meta.entities) {
    const box = document.createElement("details");
    const summary = document.createElement("summary");
    summary.append(checkbox(`${entity.name}.*`, entity.name, "entity"));
    if (entity.description) summary.title = entity.description;
    const types = document.createElement("div");
    types.className = "types";
    for (const type of entity.event_types) types.append(checkbox(type, type.split(".")[1], "type"));
    box.append(summary, types);
    entities.append(box);
  }
  const tables = meta.entities.filter((e) => e.table);
  const pick = $("field-entity");
  pick.replaceChildren(new Option("(none)", ""), ...tables.map((e) => new Option(e.name, e.name)));
  fill($("organizations"), meta.organizations.map((o) => [o, o || "(empty)"]));
  fill($("domains"), meta.domains.map((d) => [d.id, `${d.id || "(empty)"} · ${d.organization_id}`]));
  renderFields("");
}

/** The metadata entry of entity `name`, if any. */
export function entityMeta(name) {
  return metadata?.entities.find((e) => e.name === name) ?? null;
}

$("field-entity").addEventListener("change", () => renderFields($("field-entity").value));
$("add-predicate").addEventListener("click", () => addPredicate());

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

function operatorSelect(operators, chosen = "eq") {
  const select = document.createElement("select");
  select.className = "op";
  for (const op of operators) select.append(new Option(op.replace("_", " "), op));
  select.value = chosen;
  return select;
}

/** One control per filterable field of `name`: checkboxes of known values, else op + text. */
function renderFields(name) {
  const box = $("fields");
  box.replaceChildren();
  if (!name) return;
  const entity = entityMeta(name);
  const fields = (entity?.fields ?? []).filter((f) => f.filterable !== false);
  if (!fields.length) {
    const note = document.createElement("div");
    note.className = "muted";
    note.textContent = "The server lists no fields for this entity: add predicates by column name.";
    box.append(note);
    return;
  }
  for (const field of fields) {
    if (Array.isArray(field.values) && field.values.length) {
      const set = document.createElement("fieldset");
      set.className = "field values";
      set.dataset.field = field.name;
      const legend = document.createElement("legend");
      legend.textContent = field.name;
      legend.title = field.description ?? field.type ?? "";
      set.append(legend);
      for (const value of field.values) set.append(checkbox(value, value, "value"));
      box.append(set);
    } else {
      const row = document.createElement("div");
      row.className = "field text";
      row.dataset.field = field.name;
      row.dataset.type = field.type ?? "";
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = field.name;
      label.title = [field.type, field.description].filter(Boolean).join(" · ");
      const input = document.createElement("input");
      input.className = "value";
      input.placeholder = field.type ?? "value";
      row.append(label, operatorSelect(OPERATORS), input);
      box.append(row);
    }
  }
}

/** A free predicate row (any `data` path, `old.` prefix, nested keys with dots). */
function addPredicate([path, op, value] = ["", "eq", undefined]) {
  const row = document.createElement("div");
  row.className = "predicate";
  const pathInput = document.createElement("input");
  pathInput.className = "path";
  pathInput.placeholder = "column";
  pathInput.value = path;
  const input = document.createElement("input");
  input.className = "value";
  input.placeholder = "value";
  input.value = valueText(value);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.title = "Remove this predicate";
  remove.addEventListener("click", () => row.remove());
  row.append(pathInput, operatorSelect(OPERATORS, op), input, remove);
  $("predicates").append(row);
  return row;
}

function valueText(value) {
  if (value === undefined || value === null) return "";
  if (Array.isArray(value)) return value.join(",");
  return String(value);
}

function coerce(text, type, op) {
  const number = text !== "" && !Number.isNaN(Number(text));
  if (type && NUMERIC.test(type) && number) return Number(text);
  if (type === "boolean" && (text === "true" || text === "false")) return text === "true";
  // Without a type, a number is meant as one only where order matters.
  if (!type && number && ["lt", "lte", "gt", "gte"].includes(op)) return Number(text);
  return text;
}

function predicate(path, op, text, type) {
  if (op === "changed") return [path, op];
  if (op === "is_null") return [path, op, text.trim().toLowerCase() !== "false"];
  if (text === "") return null;
  if (op === "in" || op === "nin") return [path, op, text.split(",").map((t) => coerce(t.trim(), type, op))];
  return [path, op, coerce(text, type, op)];
}

function wherePredicates() {
  const where = [];
  for (const set of document.querySelectorAll("#fields .field.values")) {
    const values = [...set.querySelectorAll("input:checked")].map((i) => i.value);
    if (values.length === 1) where.push([set.dataset.field, "eq", values[0]]);
    else if (values.length > 1) where.push([set.dataset.field, "in", values]);
  }
  for (const row of document.querySelectorAll("#fields .field.text")) {
    const made = predicate(row.dataset.field, row.querySelector(".op").value, row.querySelector(".value").value.trim(), row.dataset.type);
    if (made) where.push(made);
  }
  for (const row of document.querySelectorAll("#predicates .predicate")) {
    const path = row.querySelector(".path").value.trim();
    const made = path && predicate(path, row.querySelector(".op").value, row.querySelector(".value").value.trim(), "");
    if (made) where.push(made);
  }
  return where;
}

/** The spec the builder shows now: `{filter, history?}`. */
export function builtSpec() {
  const filter = {};
  const types = [...document.querySelectorAll("#entities input:checked")].map((i) => i.value);
  const where = wherePredicates();
  const entity = $("field-entity").value;
  // Predicates on an entity's fields with no type chosen mean that entity's events.
  filter.type = types.length ? types : where.length && entity ? [`${entity}.*`] : ["*"];
  const orgs = [...$("organizations").selectedOptions].map((o) => o.value);
  if (orgs.length) filter.organization_id = orgs;
  const domains = [...$("domains").selectedOptions].map((o) => o.value);
  if (domains.length) filter.domain_id = domains;
  if ($("severity").value !== "debug") filter.severity = $("severity").value;
  if (where.length) filter.where = where;
  const spec = { filter };
  const history = Math.floor(Number($("history").value));
  if (history > 0) spec.history = Math.min(history, 1000);
  return spec;
}

/** Shows `spec` in the builder (after `fillBuilder`). */
export function restoreBuilder(spec) {
  const { filter = {}, history } = spec;
  const types = [filter.type ?? []].flat();
  for (const input of document.querySelectorAll("#entities input")) {
    input.checked = types.includes(input.value);
    if (input.checked && input.dataset.kind === "type") input.closest("details").open = true;
  }
  const orgs = [filter.organization_id ?? []].flat();
  for (const option of $("organizations").options) option.selected = orgs.includes(option.value);
  const domains = [filter.domain_id ?? []].flat();
  for (const option of $("domains").options) option.selected = domains.includes(option.value);
  $("severity").value = filter.severity ?? "debug";
  $("history").value = history ? String(history) : "";
  $("predicates").replaceChildren();
  const where = filter.where ?? [];
  // The field filters show the entity the types name, if they name one.
  const entity = types.map((t) => t.split(".")[0]).find((name) => name !== "*" && entityMeta(name)?.table) ?? "";
  $("field-entity").value = where.length ? entity : "";
  renderFields($("field-entity").value);
  for (const [path, op, value] of where) {
    const control = [...document.querySelectorAll("#fields .field")].find((f) => f.dataset.field === path);
    const values = [value ?? []].flat().map(String);
    if (control?.classList.contains("values") && (op === "eq" || op === "in")) {
      const boxes = [...control.querySelectorAll("input")];
      if (values.every((v) => boxes.some((b) => b.value === v)) && !boxes.some((b) => b.checked)) {
        for (const box of boxes) box.checked = values.includes(box.value);
        continue;
      }
    } else if (control?.classList.contains("text") && control.querySelector(".value").value === "") {
      control.querySelector(".op").value = op;
      control.querySelector(".value").value = op === "changed" ? "" : valueText(value);
      continue;
    }
    addPredicate([path, op, value]);
  }
}

/** A spec in words, for its card. */
export function describe(spec) {
  const { filter, history } = spec;
  const types = [filter.type ?? []].flat();
  const parts = [types.length && !types.includes("*") ? types.join(", ") : "every type"];
  if (filter.organization_id) parts.push(`org ${[filter.organization_id].flat().join(", ")}`);
  if (filter.domain_id) parts.push(`domain ${[filter.domain_id].flat().join(", ")}`);
  if (filter.severity) parts.push(`≥ ${filter.severity}`);
  for (const [path, op, value] of filter.where ?? []) {
    parts.push(`${path} ${op.replace("_", " ")}${value === undefined ? "" : ` ${valueText(value)}`}`);
  }
  if (history) parts.push(`last ${history} first`);
  return parts.join(" · ");
}

/** The specs saved in a URL query, oldest first (malformed ones are skipped). */
export function specsFrom(params) {
  const specs = [];
  for (const text of params.getAll("sub")) {
    try {
      const spec = JSON.parse(text);
      if (spec && typeof spec.filter === "object" && spec.filter !== null) {
        specs.push({ filter: spec.filter, ...(spec.history > 0 ? { history: Math.min(Math.floor(spec.history), 1000) } : {}) });
      }
    } catch {
      // A hand-edited URL: ignore that part.
    }
  }
  return specs;
}
