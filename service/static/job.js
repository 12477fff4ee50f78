// The job page: polls the job while it runs and moves the bar with the fractions its process reports, with an
// estimate of the time left from how fast those fractions have been growing, or, while the fraction stands
// still, from the count a stage reports ("... 12/50", see onnx_ops/progress.py).
"use strict";

// Same as display_fraction() in service/job_view.py: the job reports fractions of the whole job.
function displayFraction(state, fraction) {
  if (state === "succeeded" || state === "failed") return 1;
  if (state === "queued") return 0;
  return Math.min(Math.max(fraction || 0, 0), 1);
}

// Same table as stage_text() in service/job_view.py.
const STAGE_TEXT = {
  validate: "checking the model",
  evaluate: "measuring both models (latency and accuracy)",
  measured: "writing the results",
  "writing results": "writing the results",
  done: "finishing",
};

const ETA_WINDOW_S = 60; // the rate is taken over the last minute of reports
const ETA_MIN_SPAN_S = 3; // and only once reports span this long

function timeLeftText(seconds) {
  if (seconds < 10) return "a few seconds left";
  if (seconds < 60) return `about ${Math.round(seconds / 5) * 5} s left`;
  if (seconds < 3600) return `about ${Math.round(seconds / 60)} min left`;
  return `about ${(seconds / 3600).toFixed(1)} h left`;
}

// Seconds left from (time, fraction) samples: the rate over the recent window, or null when not countable yet.
function estimateLeft(samples) {
  if (samples.length < 2) return null;
  const last = samples[samples.length - 1];
  const first = samples.find((s) => last.t - s.t <= ETA_WINDOW_S) || samples[0];
  const span = last.t - first.t;
  const grown = last.f - first.f;
  if (span < ETA_MIN_SPAN_S || grown <= 0.005 || last.f >= 1) return null;
  return ((1 - last.f) * span) / grown;
}

const COUNTED = /\s(\d+)\/(\d+)$/;

// Seconds left in a counted stage from (time, done) samples of that stage, or null.
function stageLeft(samples, total) {
  if (samples.length < 2) return null;
  const first = samples[0];
  const last = samples[samples.length - 1];
  const span = last.t - first.t;
  const grown = last.done - first.done;
  if (span < ETA_MIN_SPAN_S || grown <= 0 || last.done >= total) return null;
  return ((total - last.done) * span) / grown;
}

function initJob(root) {
  const id = root.dataset.jobId;
  const stateEl = document.getElementById("job-state");
  const stageEl = document.getElementById("stage");
  const percentEl = document.getElementById("percent");
  const etaEl = document.getElementById("eta");
  const fill = document.getElementById("bar-fill");
  const bar = fill ? fill.parentElement : null;
  const samples = [];
  let counted = {name: null, samples: []}; // the current counted stage and its (time, done) samples
  let shown = 0;
  let failures = 0;

  function render(job) {
    stateEl.textContent = job.state;
    stateEl.className = `state ${job.state}`;
    const stage = job.state === "queued" ? null : job.stage;
    stageEl.textContent = job.state === "queued" ? "waiting for a worker" : STAGE_TEXT[stage] || stage || "starting";
    shown = Math.max(shown, displayFraction(job.state, job.progress)); // never moves back
    const now = performance.now() / 1000;
    if (job.state === "running") samples.push({t: now, f: shown});
    while (samples.length > 2 && now - samples[1].t > ETA_WINDOW_S) samples.shift();
    fill.style.width = `${(shown * 100).toFixed(1)}%`;
    percentEl.textContent = `${Math.floor(shown * 100)}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(shown * 100)));
    const count = job.state === "running" ? COUNTED.exec(job.stage || "") : null;
    const name = count ? job.stage.slice(0, count.index) : null;
    if (name !== counted.name) counted = {name, samples: []};
    if (count) counted.samples.push({t: now, done: Number(count[1])});
    const left = job.state === "running" ? estimateLeft(samples) : null;
    const inStage = count && left === null ? stageLeft(counted.samples, Number(count[2])) : null;
    if (left !== null) etaEl.textContent = ` · ${timeLeftText(left)}`;
    else if (inStage !== null) etaEl.textContent = ` · ${timeLeftText(inStage)} in this stage`;
    else etaEl.textContent = "";
    bar.setAttribute("aria-valuetext", `${Math.floor(shown * 100)}%${etaEl.textContent}`);
  }

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
    render(job);
    setTimeout(poll, 1000);
  }

  if (fill && (root.dataset.state === "queued" || root.dataset.state === "running")) {
    // The bar glides over one polling interval, so small steps read as steady movement.
    fill.classList.add("live");
    poll();
  }

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
  const job = document.getElementById("job");
  if (job) initJob(job);
});
