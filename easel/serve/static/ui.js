// easel's web UI: tabs, the form (kept across reloads), generate / cancel over the native API (/api/v1), PNG info.
import { $, api, fileDrop, initForm, initLoras, initStyles, inMode, readForm, restoreForm, saveForm, writeForm } from "./form.js";
import { controlUnits, initControl } from "./control.js";
import { clearSource, hasSource, initMaskBrush, maskDataUrl, maskEmpty, render, setSource,
         sourceDataUrl } from "./canvas.js";
import { initGallery, lastResult, selectedResult, setProgressText } from "./gallery.js";
import { cancelJob, currentJob, loadJobs, submitted } from "./jobs.js";
import { initInside } from "./inside.js";
import { initTrain } from "./train.js";
import { initAnimate } from "./animate.js";
import { initExtras } from "./extras.js";
import { initXYZ, readAxes } from "./xyz.js";

const EDIT_MODES = ["img2img", "inpaint", "outpaint"];
const SENT_PARAMS = ["prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale"];
let mode = "txt2img";
let pngInfo = null;  // {file, request} of the image in the PNG info tab
let samplersList = [];  // GET /api/v1/samplers (the Animate tab lists them too)

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// -- tabs (WAI-ARIA tabs pattern: the selected tab alone is in the Tab order; arrows, Home, End move) --------
const tabs = () => [...document.querySelectorAll("#tabs [role=tab]")];

function setMode(next) {
  mode = next;
  for (const tab of tabs()) {
    const on = tab.dataset.tab === next;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
  }
  document.body.dataset.mode = next;
  // tabs with a view of their own; the others (X/Y/Z too: it plots the generate form) share the generate view
  const own = ["pnginfo", "inside", "train", "animate", "extras"];
  for (const view of own) $(`${view}-view`).hidden = next !== view;
  $("generate-view").hidden = own.includes(next);
  if (own.includes(next)) return;
  $("generate-view").setAttribute("aria-labelledby", `tab-${next}`);
  for (const element of document.querySelectorAll("#generate-view [data-modes]")) {
    element.hidden = !element.dataset.modes.split(" ").includes(next);
  }
  render(next);
  syncDisabled();
  saveForm(mode);
}

function tabKeys(e) {
  const all = tabs();
  const i = all.indexOf(e.target);
  const target = { ArrowLeft: i - 1, ArrowRight: i + 1, Home: 0, End: all.length - 1 }[e.key];
  if (i < 0 || target === undefined) return;
  e.preventDefault();
  const tab = all[(target + all.length) % all.length];  // Left from the first wraps to the last, and back
  setMode(tab.dataset.tab);
  tab.focus();
}

// Fields that the request would ignore are greyed out: hires options without hires fix, the size of an
// edit that keeps the image's size.
function syncDisabled() {
  const hiresOff = !$("enable_hr").checked;
  for (const e of $("hires-options").querySelectorAll("input, select")) e.disabled = hiresOff;
  const keepSize = EDIT_MODES.includes(mode) && !$("resize_mode").value;
  $("width").disabled = $("height").disabled = keepSize;
}

// -- generating: each click queues a job; the queue list and the progress bar follow them ---------------------
function buildRequest() {
  const body = readForm(mode);  // LoRAs travel as <lora:...> tags inside the prompt
  const model = $("model");
  if (model.value && !model.selectedOptions[0].dataset.default) body.model = model.value;
  if (EDIT_MODES.includes(mode)) {
    if (!hasSource()) {
      throw new Error(`${mode} needs an image: drop one on the Image box, or use "Send to ${mode}" under a result`);
    }
    body.init_images = [sourceDataUrl()];
  }
  if (mode === "inpaint") {
    if (maskEmpty()) throw new Error("paint the area to repaint on the image first (drag the brush over it)");
    body.mask = maskDataUrl();
  }
  const units = controlUnits(mode, EDIT_MODES.includes(mode));
  if (units.length) body.controlnets = units;
  if (mode === "outpaint" && !["left", "right", "up", "down"].some((s) => body[`outpaint_${s}`] > 0)) {
    throw new Error("outpaint adds pixels on some side: set Left, Right, Up or Down above 0");
  }
  if (mode === "xyz") {
    body.axes = readAxes();
    delete body.inspect;  // a plot does not capture inside
  }
  return body;
}

async function generate() {
  showError("");
  let body;
  try { body = buildRequest(); } catch (e) { showError(e.message); return; }
  saveForm(mode);
  const button = $("generate");
  button.disabled = true;  // only while submitting: one click, one job
  if (!currentJob()) setProgressText("Submitting\u2026", "submitting");
  try {
    submitted(await api(mode === "xyz" ? "/api/v1/xyz" : "/api/v1/jobs", { method: "POST", json: body }));
  } catch (e) {
    showError(e.message);
    if (!currentJob()) setProgressText("Not started", "failed");
  } finally {
    button.disabled = false;
  }
}

function cancel() {
  const id = currentJob();
  if (!id) return;
  setProgressText("Cancelling\u2026", "cancelling");
  cancelJob(id);
}

// -- moving images between tabs ---------------------------------------------------------------------------
async function sendTo(target, result) {
  try {
    const response = await fetch(result.url);
    if (!response.ok) throw new Error(`the image is gone from the server (HTTP ${response.status})`);
    await setSource(await response.blob());
  } catch (e) { showError(e.message); return; }
  writeForm(Object.fromEntries(SENT_PARAMS.filter((k) => k in result.params).map((k) => [k, result.params[k]])));
  setMode(target);
}

function reuseSeed() {
  const r = selectedResult() || lastResult();
  if (r && r.params.seed != null) $("seed").value = r.params.seed;
}

// -- PNG info -----------------------------------------------------------------------------------------------
async function readPngInfo(file) {
  const img = $("pnginfo-image");
  img.src = URL.createObjectURL(file);
  img.hidden = false;
  $("pnginfo-actions").hidden = true;
  $("pnginfo-text").textContent = "Reading\u2026";
  try {
    const info = await api("/ui/png-info", { method: "POST", body: file,
                                             headers: { "Content-Type": file.type || "application/octet-stream" } });
    pngInfo = { file, request: info.request };
    $("pnginfo-text").textContent = info.parameters ||
      "This image carries no generation parameters (no 'parameters' or 'easel' text in the file).";
    $("pnginfo-actions").hidden = !Object.keys(info.request).length;
    const other = Object.entries(info.other || {}).map(([k, v]) => `${k}: ${v}`).join("\n");
    $("pnginfo-other").textContent = `${info.format} ${info.width}\u00d7${info.height}` + (other ? `\n${other}` : "");
  } catch (e) {
    pngInfo = null;
    $("pnginfo-text").textContent = e.message;
  }
  document.body.dataset.pnginfo = "read";
}

async function pngInfoTo(target) {
  if (!pngInfo) return;
  const fields = { ...pngInfo.request };
  if (target !== "txt2img") {
    await setSource(pngInfo.file);
    delete fields.width; delete fields.height;  // edits keep the image's size unless asked otherwise
  }
  writeForm(fields);
  setMode(target);
}

// -- wiring ---------------------------------------------------------------------------------------------------

function wire() {
  for (const tab of tabs()) tab.addEventListener("click", () => setMode(tab.dataset.tab));
  $("tabs").addEventListener("keydown", tabKeys);
  const save = () => saveForm(mode);
  for (const id of ["params", "prompt", "negative_prompt"]) $(id).addEventListener("input", save);
  $("params").addEventListener("change", save);
  $("model").addEventListener("change", save);
  $("generate").addEventListener("click", generate);
  $("cancel").addEventListener("click", cancel);
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  }
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", reuseSeed);
  const load = (file) => setSource(file).then(() => render(mode)).catch((e) => showError(e.message));
  $("source-file").addEventListener("change", (e) => { if (e.target.files[0]) load(e.target.files[0]); });
  fileDrop($("dropzone"), load);
  fileDrop($("canvas-wrap"), load);
  $("source-clear").addEventListener("click", clearSource);
  $("enable_hr").addEventListener("input", syncDisabled);
  $("resize_mode").addEventListener("input", syncDisabled);
  for (const side of ["left", "right", "up", "down"]) $(`outpaint_${side}`).addEventListener("input", () => render(mode));
  initMaskBrush();
  initGallery(sendTo);
  initInside();
  $("pnginfo-file").addEventListener("change", (e) => { if (e.target.files[0]) readPngInfo(e.target.files[0]); });
  fileDrop($("pnginfo-drop"), readPngInfo);
  fileDrop($("pnginfo-image"), readPngInfo);
  for (const target of ["txt2img", "img2img", "inpaint"]) {
    $(`pnginfo-${target}`).addEventListener("click", () => pngInfoTo(target));
  }
}

function fillModels(models) {
  const select = $("model");
  const options = models.map((m) => {
    const option = new Option(`${m.name} (${m.kind})`, m.name, false, m.default);
    if (m.default) option.dataset.default = "true";
    return option;
  });
  if (!models.some((m) => m.default)) options.unshift(Object.assign(new Option("server default", ""), { selected: true }));
  select.replaceChildren(...options);
}

async function boot() {
  let saved = null;
  let config = null;
  try {
    let samplers, schedulers, loras, models, styles, controlnets, preprocessors;
    [config, samplers, schedulers, loras, models, styles, controlnets, preprocessors] = await Promise.all(
      ["/ui/config.json", "/api/v1/samplers", "/api/v1/schedulers", "/api/v1/loras", "/api/v1/models",
       "/api/v1/styles", "/api/v1/controlnets", "/api/v1/preprocessors"]
        .map((p) => (p === "/api/v1/styles" ? api(p).catch(() => []) : api(p))));  // a bad styles.csv: no styles
    initForm(config, samplers, schedulers);
    samplersList = samplers;
    initLoras(loras);
    initStyles(styles);
    initControl(controlnets, preprocessors, () => {});
    fillModels(models);
    saved = restoreForm();
    $("server-status").textContent = `easel ${config.version}`;
  } catch (e) {
    showError(`could not load the form from the server: ${e.message}`);
  }
  wire();
  setMode(saved && tabs().some((t) => t.dataset.tab === saved.mode) ? saved.mode : "txt2img");
  await initTrain(config);
  await Promise.all([initAnimate(samplersList, config), initExtras(), initXYZ()]);
  try {
    // finished jobs' images, and the running one followed again after a reload
    await loadJobs(showError, config && config.finished_states);
  } catch (e) {
    showError(`could not load the server's jobs: ${e.message}`);
  }
  document.body.dataset.ready = "true";
}

// Exposed for scripts and tests that drive the page (e.g. screenshots), not needed by the page itself.
window.easel = { setMode, inMode };
boot();
