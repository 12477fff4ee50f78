// Helpers every page uses (loaded with `defer` before the page's own script: form.js, job.js).
// The CSP allows only scripts from this origin, so nothing here is inline and no handler is in the HTML.
"use strict";

document.documentElement.classList.add("js");

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]));
  }
  return value;
}

// Equal as JSON data; key order does not matter (presets and the builder may list fields differently).
function same(a, b) {
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

document.addEventListener("DOMContentLoaded", localTimes);
