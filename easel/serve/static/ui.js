// easel's web UI: tabs, generate / cancel over the native API (/api/v1) and its server-sent events, PNG info.
import { $, api, apiUrl, initForm, initLoras, inMode, readForm, selectedLoras, writeForm } from "./form.js";
import { clearSource, hasSource, initMaskBrush, maskDataUrl, maskEmpty, render, setSource,
         sourceDataUrl } from "./canvas.js";
import { addJobResults, clearPreview, initGallery, lastResult, selectedResult, setProgressText, showPreview,
         showProgress } from "./gallery.js";

const EDIT_MODES = ["img2img", "inpaint", "outpaint"];
const SENT_PARAMS = ["prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale"];
let mode = "txt2img";
let running = null;  // {id, events: EventSource | null, done: bool}
let pngInfo = null;  // {file, request} of the image in the PNG info tab

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// -- tabs -----------------------------------------------------------------------------------------------------
function setMode(next) {
  mode = next;
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === next));
  }
  document.body.dataset.mode = next;
  $("pnginfo-view").hidden = next !== "pnginfo";
  $("generate-view").hidden = next === "pnginfo";
  if (next === "pnginfo") return;
  for (const element of document.querySelectorAll("#generate-view [data-modes]")) {
    element.hidden = !element.dataset.modes.split(" ").includes(next);
  }
  render(next);
  syncDisabled();
}

// Fields that the request would ignore are greyed out: hires options without hires fix, the size of an
// edit that keeps the image's size.
function syncDisabled() {
  const hiresOff = !$("enable_hr").checked;
  for (const e of $("hires-options").querySelectorAll("input, select")) e.disabled = hiresOff;
  const keepSize = mode !== "txt2img" && !$("resize_mode").value;
  $("width").disabled = $("height").disabled = keepSize;
}

// -- generating -----------------------------------------------------------------------------------------------
function buildRequest() {
  const body = readForm(mode);
  const loras = selectedLoras();
  if (loras.length) body.loras = loras;
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
  if (mode === "outpaint" && !["left", "right", "up", "down"].some((s) => body[`outpaint_${s}`] > 0)) {
    throw new Error("outpaint adds pixels on some side: set Left, Right, Up or Down above 0");
  }
  return body;
}

async function generate() {
  if (running) return;
  showError("");
  let body;
  try { body = buildRequest(); } catch (e) { showError(e.message); return; }
  setRunning(true);
  setProgressText("Submitting\u2026", "submitting");
  try {
    const job = await api("/api/v1/jobs", { method: "POST", json: body });
    running = { id: job.id, events: null, done: false };
    document.body.dataset.job = job.id;
    follow(job.id);
  } catch (e) {
    showError(e.message);
    setProgressText("Not started", "failed");
    setRunning(false);
  }
}

function setRunning(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  document.body.dataset.busy = String(on);
}

// Follow a job over server-sent events; if the stream breaks, poll the job instead.
function follow(id) {
  const events = new EventSource(apiUrl(`/api/v1/jobs/${id}/events`));
  running.events = events;
  events.addEventListener("progress", (e) => showProgress(JSON.parse(e.data)));
  events.addEventListener("preview", (e) => showPreview(JSON.parse(e.data).image));
  events.addEventListener("done", (e) => { events.close(); finish(JSON.parse(e.data)); });
  events.onerror = () => {
    if (!running || running.done) return;
    events.close();
    poll(id);
  };
}

async function poll(id) {
  while (running && !running.done) {
    try {
      const job = await api(`/api/v1/jobs/${id}`);
      if (["done", "failed", "cancelled"].includes(job.state)) { finish(job); return; }
      showProgress(job);
    } catch (e) {
      showError(e.message);
      if (e.status === 404) { finish({ id, state: "failed", error: e.message, images: [] }); return; }
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function finish(job) {
  if (!running || running.done) return;
  running.done = true;
  running = null;
  setRunning(false);
  clearPreview();
  const n = (job.images || []).length;
  if (job.state === "failed") {
    showError(job.error || "the job failed");
    setProgressText("Failed", "failed");
  } else if (job.state === "cancelled") {
    setProgressText(n ? `Cancelled (kept ${n} finished image(s))` : "Cancelled", "cancelled");
  } else {
    const seconds = job.finished && job.started ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
    setProgressText(`Done: ${n} image(s)${seconds}`, "done");
    $("progress-fill").style.width = "100%";
  }
  await addJobResults(job);
  document.body.dataset.finished = job.id;  // tests (and scripts) wait on this
}

async function cancel() {
  if (!running) return;
  setProgressText("Cancelling\u2026", "cancelling");
  try {
    await api(`/api/v1/jobs/${running.id}`, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 409) showError(e.message);  // 409: it finished meanwhile; the done event follows
  }
}

// -- moving images between tabs ---------------------------------------------------------------------------
async function sendTo(target, result) {
  try {
    const response = await fetch(apiUrl(result.url));
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
function fileDrop(zone, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    const url = e.dataTransfer.getData("text/uri-list");
    if (file) onFile(file);
    else if (url) onFile(await (await fetch(url)).blob());  // an image dragged from the gallery
  });
}

function wire() {
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    tab.addEventListener("click", () => setMode(tab.dataset.tab));
  }
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
  try {
    const [config, samplers, schedulers, loras, models] = await Promise.all(
      ["/ui/config.json", "/api/v1/samplers", "/api/v1/schedulers", "/api/v1/loras", "/api/v1/models"].map((p) => api(p)));
    initForm(config, samplers, schedulers);
    initLoras(loras);
    fillModels(models);
    $("server-status").textContent = `easel ${config.version}`;
  } catch (e) {
    showError(`could not load the form from the server: ${e.message}`);
  }
  wire();
  setMode("txt2img");
  document.body.dataset.ready = "true";
}

// Exposed for scripts and tests that drive the page (e.g. screenshots), not needed by the page itself.
window.easel = { setMode, inMode };
boot();
