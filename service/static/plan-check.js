// The server's plan check (/form/plan-check, service/plan_check.py): asked as the plan changes, its reasons
// shown at the step or field each concerns, so a plan the upload would refuse is not sent with the files.
"use strict";

class PlanCheck {
  // ctx: {form, steps, textarea, status, problems, options, fileInputs, groups(), planFields(), onAnswer(result)}
  constructor(ctx) {
    Object.assign(this, ctx);
    this.answered = {key: null, result: null};
    this.pending = null;
    this.timer = null;
  }

  key() {
    const files = this.fileInputs.filter((i) => i.files.length).map((i) => i.name);
    return JSON.stringify({plan: this.textarea.value, files});
  }

  // The answer for the plan and files as they are now (null when the check could not be asked).
  now() {
    const key = this.key();
    if (this.answered.key === key) {
      this.show(this.answered.result); // the status may say "checking" since an edit that changed nothing
      return Promise.resolve(this.answered.result);
    }
    if (this.pending && this.pending.key === key) return this.pending.promise;
    const request = {method: "POST", headers: {"Content-Type": "application/json"}, body: key, cache: "no-store"};
    const promise = fetch("/form/plan-check", {...request, credentials: "same-origin"})
      .then((response) => (response.ok ? response.json() : null))
      .catch(() => null) // the upload checks again; an unreachable check must not block it
      .then((result) => {
        if (this.pending && this.pending.key === key) this.pending = null;
        if (key === this.key()) {
          this.answered = {key, result};
          this.show(result);
        }
        return result;
      });
    this.pending = {key, promise};
    return promise;
  }

  schedule() {
    clearTimeout(this.timer);
    this.status.textContent = "Checking the plan…";
    this.status.className = "note";
    this.timer = setTimeout(() => this.now(), 150);
  }

  cancel() {
    clearTimeout(this.timer);
  }

  // The step or field a pydantic error location points at (null: the plan as a whole).
  target(loc) {
    const fieldIn = (container, name) =>
      typeof name === "string" ? container.querySelector(`:scope > .field[data-field="${CSS.escape(name)}"]`) : null;
    if (loc[0] === "steps" && Number.isInteger(loc[1]) && this.steps.children[loc[1]]) {
      const item = this.steps.children[loc[1]];
      const field = fieldIn(item.querySelector(".fields"), loc[3]);
      return field && !field.hidden ? field : item;
    }
    for (const group of this.groups()) {
      const field = fieldIn(group.fields, group.name ? (loc[0] === group.name ? loc[1] : null) : loc[0]);
      if (field) return field.hidden ? null : field;
    }
    return null;
  }

  show(result) {
    if (result) this.onAnswer(result);
    const placed = new Map();
    for (const err of (result && result.errors) || []) {
      const target = this.target(err.loc);
      if (!target) continue;
      const where = target.classList.contains("step") ? err.loc.slice(3).join(".") : "";
      placed.set(target, [placed.get(target), (where ? `${where}: ` : "") + err.message].filter(Boolean).join("; "));
    }
    for (const el of this.planFields()) showProblem(el, inputProblem(el) || placed.get(el) || "");
    for (const item of this.steps.children) {
      const p = item.querySelector(":scope > .step-problem");
      p.textContent = placed.get(item) || "";
      p.hidden = !placed.get(item);
      item.classList.toggle("invalid", Boolean(placed.get(item)));
    }
    const refused = Boolean(result && !result.ok);
    if (refused) {
      this.problems.textContent = `The server would refuse this plan: ${result.message}`;
      this.status.textContent = "The server would refuse this plan; the reasons are marked above and below.";
      this.status.className = "note bad";
      if (Array.from(placed.keys()).some((el) => this.options.contains(el))) this.options.open = true;
    } else {
      this.status.textContent = result ? "The server accepts this plan." : "";
      this.status.className = "note good";
    }
    this.problems.hidden = !refused;
  }
}
