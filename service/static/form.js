// The form's plan builder. The widgets come from the plan schema (service/form_schema.py) and carry choices and
// defaults as JSON, so the plan keeps the schema's types (embedding_bits is 8, not "8"). The server's own plan
// check (/form/plan-check) answers as the plan changes and its reasons are shown at the step or field they
// concern, so a plan the upload would refuse is never sent with the files.
"use strict";

// Widget values: plan-fields.js; the model's inputs: onnx-inputs.js; the plan check: plan-check.js; chosen
// files named again after a refusal: form-files.js.

// --- the plan builder -------------------------------------------------------------------------------------

function initBuilder(form) {
  const steps = document.getElementById("steps");
  const textarea = document.getElementById("plan");
  const status = document.getElementById("plan-status");
  const noSteps = document.getElementById("no-steps");
  const options = document.getElementById("plan-options");
  const calibration = document.getElementById("calibration");
  const calibrationReq = document.getElementById("calibration-req");
  const addRules = document.getElementById("add-rules");
  const problems = document.getElementById("plan-problems");
  const submitStatus = document.getElementById("submit-status");
  const fileInputs = Array.from(form.querySelectorAll("input[type=file]"));
  // Step kinds that store weights in a format no other pass reads: one per plan, as its last step (the plan
  // schema's FINAL_KINDS, written into the page by the server).
  const finalKinds = JSON.parse(document.getElementById("builder").dataset.finalKinds);
  const isFinal = (kind) => finalKinds.includes(kind);
  form.noValidate = true; // problems are shown next to the controls instead of in browser bubbles

  // The plan's controls: the builder's steps and options, and the plan-level fields by the model file.
  function isPlanControl(el) {
    return Boolean(el.closest("#builder") || el.closest("[data-group]"));
  }

  function planFields() {
    return form.querySelectorAll("#builder .field, [data-group] .field");
  }

  function groups() {
    return Array.from(form.querySelectorAll("[data-group]"), (group) => ({
      name: group.dataset.group,
      fields: group.classList.contains("fields") ? group : group.querySelector(".fields"),
    }));
  }

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
    for (const {name, fields} of groups()) {
      const values = readFields(fields);
      if (!name) Object.assign(plan, values);
      else if (Object.keys(values).length) plan[name] = values;
    }
    return plan;
  }

  function writePlan(plan) {
    steps.replaceChildren();
    for (const step of plan.steps || []) addStep(step.kind, step);
    for (const {name, fields} of groups()) writeFields(fields, name ? plan[name] || {} : plan);
    if (plan.evaluation) options.open = true;
    refresh(false);
  }

  // The plan schema's order rules, kept by the add buttons instead of refused after the upload.
  function updateAddButtons(kinds) {
    const rules = [];
    for (const button of document.querySelectorAll(".add-step")) {
      const kind = button.dataset.kind;
      let why = "";
      if (kind === "auto" && kinds.length && !(kinds.length === 1 && kinds[0] === "auto")) {
        why = "auto chooses the prune, svd and quantize steps itself, so it must be the only step: remove the others first";
      } else if (kind === "auto" && kinds.includes("auto")) why = "the plan has its auto step";
      else if (kind !== "auto" && kinds.includes("auto")) why = "auto must be the only step: remove it first";
      else if (isFinal(kind) && kinds.some(isFinal)) {
        why = `a plan ends in at most one of ${finalKinds.join(", ")}`;
      } else if (kind === "distill" && !kinds.includes("prune") && !kinds.includes("svd")) {
        why = "distill needs a prune or svd step before it: it refits the layers they change";
      }
      button.disabled = Boolean(why);
      button.dataset.summary = button.dataset.summary || button.title;
      button.title = why || button.dataset.summary;
      if (why && !rules.includes(why)) rules.push(why);
    }
    addRules.textContent = rules.length ? `Greyed out: ${rules.join("; ")}.` : "";
    addRules.hidden = !rules.length;
  }

  function refresh(toText) {
    const plan = readPlan();
    if (toText) textarea.value = JSON.stringify(plan, null, 2);
    let n = 0;
    for (const item of steps.children) {
      n += 1;
      item.querySelector(".step-no").textContent = `${n}.`;
    }
    noSteps.hidden = n > 0;
    updateAddButtons(plan.steps.map((s) => s.kind));
    for (const button of document.querySelectorAll(".preset")) {
      button.classList.toggle("active", same(withoutDefaults(JSON.parse(button.dataset.plan)), plan));
    }
    updateShapesPrompt();
    scheduleCheck();
  }

  // --- the model's inputs: a shape is asked for up front when the model leaves dimensions open ---

  const modelInput = document.getElementById("model");
  const inputsNote = document.getElementById("model-inputs");
  const shapesBox = document.getElementById("model-shapes");
  let modelInputs = null; // the chosen model's inputs; "unreadable" when the browser could not read them

  async function describeModel() {
    const file = modelInput.files[0];
    let inputs = null;
    if (file) {
      try {
        inputs = await onnxInputs(file);
      } catch (e) {
        inputs = "unreadable";
      }
    }
    if (modelInput.files[0] !== file) return; // another file was chosen meanwhile
    modelInputs = inputs;
    updateShapesPrompt();
  }

  function updateShapesPrompt() {
    const field = shapesBox.querySelector('.field[data-field="input_shapes"]');
    const given = readField(field) || {};
    const file = modelInput.files[0];
    const open = Array.isArray(modelInputs) ? openInputs(modelInputs) : [];
    const missing = open.filter((i) => !(i.name in given));
    const dataChosen = fileInputs.some((i) => i.name !== "model" && i.files.length);
    shapesBox.hidden = !(open.length || Object.keys(given).length || modelInputs === "unreadable");
    const example = (i) => `${i.name}: ${i.dims.map((d, k) => (typeof d === "number" ? d : k ? "?" : 1)).join(", ")}`;
    field.querySelector("input").placeholder = open.length ? open.map(example).join("; ") : "input_ids: 1, 128";
    let text = "";
    if (file && Array.isArray(modelInputs)) {
      const shown = modelInputs.slice(0, 8).map((i) => `${i.name} [${(i.dims || ["?"]).join(", ")}]`);
      const more = modelInputs.length > 8 ? ` and ${modelInputs.length - 8} more` : "";
      text = `${file.name} takes ${shown.join(", ")}${more}.`;
      if (missing.length) {
        const names = missing.map((i) => i.name).join(", ");
        text += dataChosen
          ? ` The chosen data gives the open dimensions of ${names}.`
          : ` ${names} ${missing.length > 1 ? "leave" : "leaves"} dimensions open: give the shape below, or choose calibration or evaluation data, whose arrays give it.`;
      }
    } else if (file && modelInputs === "unreadable") {
      text = "The browser could not read this file's inputs; the server checks the model when the job runs.";
    }
    inputsNote.textContent = text;
    inputsNote.classList.toggle("warn", missing.length > 0 && !dataChosen);
  }

  // Whether the plan needs calibration data is the server's rule (Plan.calibration_user), told by the plan check.
  function onAnswer(result) {
    calibration.required = Boolean(result.calibration);
    calibrationReq.hidden = !result.calibration;
    calibrationReq.textContent = result.calibration ? `required for ${result.calibration}` : "";
    if (!result.calibration) showProblem(calibration.closest(".field"), fileProblem(calibration));
  }

  const check = new PlanCheck({
    form, steps, textarea, status, problems, options, fileInputs, groups, planFields, onAnswer,
  });
  const scheduleCheck = () => check.schedule();

  // --- events ---

  try {
    writePlan(JSON.parse(textarea.value)); // the default plan, or the user's plan shown again after an error
  } catch (e) {
    status.textContent = "The plan below is not valid JSON, so the controls above do not show it.";
    status.className = "note bad";
    scheduleCheck();
  }
  if (document.getElementById("form-error")) askForFilesAgain(fileInputs);

  form.addEventListener("input", (ev) => {
    if (isPlanControl(ev.target)) refresh(true);
  });
  form.addEventListener("change", (ev) => {
    if (isPlanControl(ev.target)) refresh(true);
    else if (ev.target.type === "file") {
      showProblem(ev.target.closest(".field"), ev.target.files.length ? fileProblem(ev.target) : "");
      if (ev.target === modelInput) describeModel();
      updateShapesPrompt();
      scheduleCheck();
    }
  });
  textarea.addEventListener("input", () => {
    // Hand edits win: mirror them in the controls when they parse, leave the text alone either way.
    try {
      writePlan(JSON.parse(textarea.value));
    } catch (e) {
      scheduleCheck(); // the check says where the JSON breaks
    }
  });
  document.getElementById("builder").addEventListener("click", (ev) => {
    const button = ev.target.closest("button");
    if (!button || button.disabled) return;
    if (button.classList.contains("preset")) writePlan(JSON.parse(button.dataset.plan));
    else if (button.classList.contains("add-step")) {
      const item = addStep(button.dataset.kind, {});
      // Quantize, int4 and fp16 must stay last (the plan schema refuses anything after them): new steps go before.
      const last = Array.from(steps.children).find((el) => isFinal(el.dataset.kind));
      if (item && last && item !== last) steps.insertBefore(item, last);
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

  function prepareUpload() {
    // Browsers send an empty part for a file input left empty; leave optional ones out entirely.
    for (const input of fileInputs) if (!input.files.length && !input.required) input.disabled = true;
    rememberFiles(fileInputs);
    document.getElementById("submit").disabled = true;
    submitStatus.textContent = "Uploading…";
  }

  let approved = false;
  form.addEventListener("submit", async (ev) => {
    if (approved) {
      prepareUpload();
      return;
    }
    ev.preventDefault();
    submitStatus.textContent = "Checking…";
    check.cancel();
    const result = await check.now(); // first: its answer says whether the calibration file is required
    const local = [];
    for (const el of planFields()) if (!el.closest("[hidden]") && inputProblem(el)) local.push(el);
    for (const input of fileInputs) {
      const problem = fileProblem(input);
      showProblem(input.closest(".field"), problem);
      if (problem) local.push(input.closest(".field"));
    }
    if (local.length || (result && !result.ok)) {
      submitStatus.textContent = "Not sent: first fix what is marked in red.";
      const first = form.querySelector(".invalid") || problems;
      first.scrollIntoView({block: "center"});
      return;
    }
    approved = true;
    // In a new task: when the check was already answered this code still runs inside the submit event's
    // dispatch, and a form ignores requestSubmit() while it is firing its submit event.
    setTimeout(() => {
      if (form.requestSubmit) form.requestSubmit();
      else {
        prepareUpload();
        form.submit();
      }
    }, 0);
  });
  // Back/forward cache can restore the page with the inputs still disabled.
  window.addEventListener("pageshow", () => {
    approved = false;
    for (const input of fileInputs) input.disabled = false;
    document.getElementById("submit").disabled = false;
    submitStatus.textContent = "";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("job-form");
  if (form) initBuilder(form);
});
