// The form's file inputs: checks before the upload, and the chosen files named again after a refused upload
// (browsers cannot refill a file input, so the refusal page says which files to choose again).
"use strict";

const FILES_KEY = "onnx-compress:chosen-files";

function fileProblem(input) {
  const file = input.files[0];
  const label = {model: "a model (.onnx) file", calibration: "a calibration .npz", evaluation: "an .npz"}[input.name];
  if (!file) return input.required ? `Choose ${label}.` : "";
  const maxMb = Number(input.dataset.maxMb);
  if (maxMb && file.size > maxMb * 1048576) {
    return `This file is ${(file.size / 1048576).toFixed(1)} MB; the server takes at most ${maxMb} MB.`;
  }
  if (file.size === 0) return "This file is empty (0 bytes).";
  return "";
}

function rememberFiles(fileInputs) {
  const chosen = {};
  for (const input of fileInputs) if (input.files.length) chosen[input.name] = input.files[0].name;
  try {
    sessionStorage.setItem(FILES_KEY, JSON.stringify(chosen));
  } catch (e) {
    // storage off: the refusal page then asks for the files without naming them
  }
}

function askForFilesAgain(fileInputs) {
  let chosen = {};
  try {
    chosen = JSON.parse(sessionStorage.getItem(FILES_KEY) || "{}");
    sessionStorage.removeItem(FILES_KEY);
  } catch (e) {
    return;
  }
  const names = [];
  for (const input of fileInputs) {
    const name = chosen[input.name];
    if (typeof name !== "string") continue;
    names.push(`${input.name} (${name})`);
    showProblem(input.closest(".field"), `Choose ${name} again: the browser dropped it with the refused upload.`);
  }
  if (names.length) document.getElementById("refill-list").textContent = `choose ${names.join(", ")} again`;
}
