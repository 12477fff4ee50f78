// One plan-schema widget <-> one JSON value (the widgets come from service/form_schema.py through
// templates/_widgets.html). Choices and defaults are JSON in data-* attributes, so values keep their types.
"use strict";

function parseShapes(text) {
  // "input_ids: 1, 128; mask: 1, 128" -> {"input_ids": [1, 128], "mask": [1, 128]}
  const shapes = {};
  for (const part of text.split(/[;\n]/)) {
    if (!part.trim()) continue;
    const at = part.lastIndexOf(":");
    const name = at < 0 ? part.trim() : part.slice(0, at).trim();
    const dims = at < 0 ? "" : part.slice(at + 1);
    // A dimension that is not a number is kept as text so the server's check names it.
    shapes[name] = dims.split(/[,x\s]+/).filter(Boolean).map((d) => (/^\d+$/.test(d) ? Number(d) : d));
  }
  return shapes;
}

function shapesText(shapes) {
  return Object.entries(shapes || {}).map(([k, v]) => `${k}: ${[].concat(v).join(", ")}`).join("; ");
}

function readField(el) {
  const type = el.dataset.type;
  const optional = el.dataset.optional === "1";
  const fallback = JSON.parse(el.dataset.default);
  if (type === "bool") return el.querySelector("input").checked;
  // Choices hold their JSON value, so numbers, booleans and null keep their type.
  if (type === "multi") return Array.from(el.querySelectorAll("input:checked"), (i) => JSON.parse(i.value));
  if (type === "select") return JSON.parse(el.querySelector("select").value);
  const text = el.querySelector("input").value.trim();
  if (type === "int" || type === "float") {
    if (text === "") return optional ? null : fallback;
    const n = Number(text);
    return Number.isFinite(n) ? n : text; // the server's check explains what is wrong with text
  }
  if (type === "shapes") return parseShapes(text);
  if (type === "list") {
    if (text === "") return optional ? null : [];
    return text.split(",").map((s) => s.trim()).filter(Boolean);
  }
  return text;
}

function writeField(el, value) {
  const type = el.dataset.type;
  if (value === undefined) value = JSON.parse(el.dataset.default);
  if (type === "bool") el.querySelector("input").checked = Boolean(value);
  else if (type === "multi") {
    const wanted = Array.isArray(value) ? value : [];
    for (const box of el.querySelectorAll("input")) box.checked = wanted.some((v) => same(v, JSON.parse(box.value)));
  } else if (type === "select") {
    const select = el.querySelector("select");
    const match = Array.from(select.options).find((o) => same(JSON.parse(o.value), value));
    // A value that is not a choice (typed into the JSON) stays in the text, where the check marks it.
    select.value = match ? match.value : el.dataset.default;
  } else if (type === "shapes") el.querySelector("input").value = shapesText(value);
  else if (type === "list") el.querySelector("input").value = Array.isArray(value) ? value.join(", ") : "";
  else el.querySelector("input").value = value === null ? "" : String(value);
}

// Fields the schema describes as "<value> only" are hidden unless their switch has that value.
function updateRelevance(container) {
  for (const el of container.querySelectorAll(":scope > .field[data-only-field]")) {
    const owner = container.querySelector(`:scope > .field[data-field="${el.dataset.onlyField}"]`);
    el.hidden = owner !== null && !same(readField(owner), JSON.parse(el.dataset.onlyValue));
  }
}

// Only fields that differ from the schema's defaults go into the plan, so the JSON stays short.
function readFields(container) {
  const out = {};
  for (const el of container.querySelectorAll(":scope > .field")) {
    const value = readField(el);
    const changed = !same(value, JSON.parse(el.dataset.default));
    el.classList.toggle("changed", changed);
    if (changed && !el.hidden) out[el.dataset.field] = value;
  }
  return out;
}

function writeFields(container, values) {
  for (const el of container.querySelectorAll(":scope > .field")) writeField(el, values[el.dataset.field]);
  updateRelevance(container);
}

// A preset as readPlan() would write it: step fields equal to their defaults left out.
function withoutDefaults(plan) {
  const steps = (plan.steps || []).map((step) => {
    const template = document.getElementById(`tpl-step-${step.kind}`);
    const out = {...step};
    for (const el of template ? template.content.querySelectorAll(".field") : []) {
      if (same(out[el.dataset.field], JSON.parse(el.dataset.default))) delete out[el.dataset.field];
    }
    return out;
  });
  return {...plan, steps};
}

function showProblem(el, message) {
  const p = el.querySelector(":scope > .problem");
  if (p) {
    p.textContent = message || "";
    p.hidden = !message;
  }
  el.classList.toggle("invalid", Boolean(message));
}

// A number input holding text the browser cannot read reports "" as its value: say so where it is.
function inputProblem(el) {
  const input = el.querySelector(":scope input[type=number]");
  return input && input.validity.badInput ? "This is not a number." : "";
}
