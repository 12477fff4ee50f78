// The form's plan builder and the job page's progress polling. Loaded with `defer` from every page.
// The CSP allows only scripts from this origin, so nothing here is inline and no handler is in the HTML.
"use strict";

document.documentElement.classList.add("js");

// --- helpers ---------------------------------------------------------------------------------------------

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]));
  }
  return value;
}

function same(a, b) {
  // Key order does not matter: presets and the builder may list fields differently.
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

function localTimes() {
  // Server renders UTC; show the reader's local time instead.
  for (const el of document.querySelectorAll("time[datetime]")) {
    const d = new Date(el.getAttribute("datetime"));
    if (!isNaN(d)) {
      el.title = el.textContent;
      el.textContent = d.toLocaleString();
    }
  }
}

// --- one field widget <-> one JSON value ------------------------------------------------------------------

function parseShapes(text) {
  // "input_ids: 1, 128; mask: 1, 128" -> {"input_ids": [1, 128], "mask": [1, 128]}
  const shapes = {};
  for (const part of text.split(/[;\n]/)) {
    if (!part.trim()) continue;
    const at = part.lastIndexOf(":");
    const name = at < 0 ? part.trim() : part.slice(0, at).trim();
    const dims = at < 0 ? "" : part.slice(at + 1);
    // A dimension that is not a number is kept as text so the server's error names it.
    shapes[name] = dims.split(/[,x\s]+/).filter(Boolean).map((d) => (/^\d+$/.test(d) ? Number(d) : d));
  }
  return shapes;
}

function shapesText(shapes) {
  return Object.entries(shapes || {}).map(([k, v]) => `${k}: ${v.join(", ")}`).join("; ");
}

function readField(el) {
  const type = el.dataset.type;
  const optional = el.dataset.optional === "1";
  const fallback = JSON.parse(el.dataset.default);
  if (type === "bool") return el.querySelector("input").checked;
  if (type === "multi") {
    return Array.from(el.querySelectorAll("input:checked"), (i) => i.value);
  }
  if (type === "select") return el.querySelector("select").value;
  const text = el.querySelector("input").value.trim();
  if (type === "int" || type === "float") {
    if (text === "") return optional ? null : fallback;
    const n = Number(text);
    return Number.isFinite(n) ? n : text; // the server explains what is wrong with text
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
    for (const box of el.querySelectorAll("input")) box.checked = (value || []).includes(box.value);
  } else if (type === "select") el.querySelector("select").value = value;
  else if (type === "shapes") el.querySelector("input").value = shapesText(value);
  else if (type === "list") el.querySelector("input").value = value === null ? "" : value.join(", ");
  else el.querySelector("input").value = value === null ? "" : String(value);
}

// Fields the schema describes as "<value> only" are hidden unless their switch has that value.
function updateRelevance(container) {
  for (const el of container.querySelectorAll(":scope > .field[data-only-field]")) {
    const owner = container.querySelector(`:scope > .field[data-field="${el.dataset.onlyField}"]`);
    el.hidden = owner !== null && readField(owner) !== el.dataset.onlyValue;
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

// --- the plan builder -------------------------------------------------------------------------------------

function initBuilder(form) {
  const steps = document.getElementById("steps");
  const textarea = document.getElementById("plan");
  const status = document.getElementById("plan-status");
  const noSteps = document.getElementById("no-steps");
  const options = document.getElementById("plan-options");
  const calibration = document.getElementById("calibration");
  const calibrationReq = document.getElementById("calibration-req");

  function addStep(kind, values) {
    const template = document.getElementById(`tpl-step-${kind}`);
    if (!template) return null;
    const item = template.content.firstElementChild.cloneNode(true);
    steps.appendChild(item);
    writeFields(item.querySelector(".fields"), values || {});
    return item;
  }

  function readPlan() {
    const plan = {steps: []};
    for (const item of steps.children) {
      const fields = item.querySelector(".fields");
      updateRelevance(fields);
      plan.steps.push({kind: item.dataset.kind, ...readFields(fields)});
    }
    for (const group of options.querySelectorAll("[data-group]")) {
      const fields = group.classList.contains("fields") ? group : group.querySelector(".fields");
      const values = readFields(fields);
      if (group.dataset.group) {
        if (Object.keys(values).length) plan[group.dataset.group] = values;
      } else Object.assign(plan, values);
    }
    return plan;
  }

  function writePlan(plan) {
    steps.replaceChildren();
    for (const step of plan.steps || []) addStep(step.kind, step);
    for (const group of options.querySelectorAll("[data-group]")) {
      const fields = group.classList.contains("fields") ? group : group.querySelector(".fields");
      writeFields(fields, group.dataset.group ? plan[group.dataset.group] || {} : plan);
    }
    if (Object.keys(plan).some((k) => k !== "steps")) options.open = true;
    refresh(false);
  }

  function refresh(toText) {
    const plan = readPlan();
    if (toText) {
      textarea.value = JSON.stringify(plan, null, 2);
      status.textContent = "";
      status.classList.remove("bad");
    }
    let n = 0;
    for (const item of steps.children) {
      n += 1;
      item.querySelector(".step-no").textContent = `${n}.`;
    }
    noSteps.hidden = n > 0;
    const needsCalibration = plan.steps.some((s) => s.kind === "quantize" && s.mode === "static");
    calibration.required = needsCalibration;
    calibrationReq.hidden = !needsCalibration;
    for (const button of document.querySelectorAll(".preset")) {
      button.classList.toggle("active", same(withoutDefaults(JSON.parse(button.dataset.plan)), plan));
    }
  }

  // Start from what the textarea holds: the default plan, or the user's plan shown again after an error.
  try {
    writePlan(JSON.parse(textarea.value));
  } catch (e) {
    status.textContent = "The plan below is not valid JSON, so the controls above do not show it.";
    status.classList.add("bad");
  }

  form.addEventListener("input", (ev) => {
    if (ev.target.closest("#builder")) refresh(true);
  });
  form.addEventListener("change", (ev) => {
    if (ev.target.closest("#builder")) refresh(true);
  });
  textarea.addEventListener("input", () => {
    // Hand edits win: mirror them in the controls when they parse, leave the text alone either way.
    try {
      writePlan(JSON.parse(textarea.value));
      status.textContent = "";
      status.classList.remove("bad");
    } catch (e) {
      status.textContent = "Not valid JSON yet.";
      status.classList.add("bad");
    }
  });
  document.getElementById("builder").addEventListener("click", (ev) => {
    const button = ev.target.closest("button");
    if (!button) return;
    if (button.classList.contains("preset")) writePlan(JSON.parse(button.dataset.plan));
    else if (button.classList.contains("add-step")) {
      const item = addStep(button.dataset.kind, {});
      // Quantize must stay last (the plan schema refuses anything after it), so new steps go before it.
      const quantize = steps.querySelector(':scope > .step[data-kind="quantize"]');
      if (item && quantize && item !== quantize) steps.insertBefore(item, quantize);
      if (item) item.scrollIntoView({block: "nearest"});
    } else if (button.dataset.act) {
      const item = button.closest(".step");
      if (button.dataset.act === "remove") item.remove();
      else if (button.dataset.act === "up" && item.previousElementSibling) {
        steps.insertBefore(item, item.previousElementSibling);
      } else if (button.dataset.act === "down" && item.nextElementSibling) {
        steps.insertBefore(item.nextElementSibling, item);
      }
    } else return;
    refresh(true);
  });

  form.addEventListener("submit", () => {
    // Browsers send an empty part for a file input left empty; leave optional ones out entirely.
    for (const input of form.querySelectorAll("input[type=file]")) {
      if (!input.files.length && !input.required) input.disabled = true;
    }
    document.getElementById("submit").disabled = true;
    document.getElementById("submit-status").textContent = "Uploading…";
  });
  // Back/forward cache can restore the page with the inputs still disabled.
  window.addEventListener("pageshow", () => {
    for (const input of form.querySelectorAll("input[type=file]")) input.disabled = false;
    document.getElementById("submit").disabled = false;
    document.getElementById("submit-status").textContent = "";
  });
}

// --- the job page -----------------------------------------------------------------------------------------

// Same as display_fraction() in service/web.py: the job reports fractions of the whole job.
function displayFraction(state, fraction) {
  if (state === "succeeded" || state === "failed") return 1;
  if (state === "queued") return 0;
  return Math.min(Math.max(fraction || 0, 0), 1);
}

const STAGE_TEXT = {
  validate: "checking the model",
  evaluate: "measuring both models (latency and accuracy)",
  measured: "writing the results",
  "writing results": "writing the results",
  done: "finishing",
};

function initJob(root) {
  const id = root.dataset.jobId;
  const stateEl = document.getElementById("job-state");
  const stageEl = document.getElementById("stage");
  const fill = document.getElementById("bar-fill");
  const bar = fill ? fill.parentElement : null;
  let shown = 0;
  let failures = 0;

  async function poll() {
    let job;
    try {
      const response = await fetch(`/api/jobs/${encodeURIComponent(id)}`, {credentials: "same-origin", cache: "no-store"});
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      job = await response.json();
      failures = 0;
    } catch (e) {
      failures += 1;
      stageEl.textContent = `cannot reach the server (${e.message}); retrying`;
      setTimeout(poll, Math.min(10000, 1000 * 2 ** failures));
      return;
    }
    if (job.state === "succeeded" || job.state === "failed") {
      window.location.reload(); // the server renders the result
      return;
    }
    stateEl.textContent = job.state;
    stateEl.className = `state ${job.state}`;
    const stage = job.state === "queued" ? null : job.stage;
    stageEl.textContent = job.state === "queued" ? "waiting for a worker" : STAGE_TEXT[stage] || stage || "starting";
    shown = Math.max(shown, displayFraction(job.state, job.progress));
    fill.style.width = `${Math.round(shown * 100)}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(shown * 100)));
    setTimeout(poll, 1000);
  }

  if (fill && (root.dataset.state === "queued" || root.dataset.state === "running")) poll();

  // The report is same-origin: size the frame to its content so the page has one scrollbar.
  const frame = document.getElementById("report-frame");
  if (frame) {
    frame.addEventListener("load", () => {
      try {
        const doc = frame.contentDocument;
        if (doc && doc.documentElement) frame.style.height = `${doc.documentElement.scrollHeight + 20}px`;
      } catch (e) {
        // keep the CSS height
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes();
  const form = document.getElementById("job-form");
  if (form) initBuilder(form);
  const job = document.getElementById("job");
  if (job) initJob(job);
});
