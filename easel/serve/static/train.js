// The Train tab: a LoRA or an embedding trained on a dataset folder under the server's --train-root, as a job
// in the server's queue (POST /api/v1/train). Progress comes over the job's event stream, the loss curve from
// GET /api/v1/train/{id}/log (drawn as an inline SVG), the sample images from the job's train.samples.
import { $, api, addLora, refreshLoras } from "./form.js";
import { submitted } from "./jobs.js";

const SVG = "http://www.w3.org/2000/svg";
const STORE_KEY = "easel.train";
const DEFAULTS = {  // `easel train lora|embedding`'s own defaults
  lora: { steps: 500, lr: 1e-4 },
  embedding: { steps: 1000, lr: 5e-3 },
  common: { kind: "lora", batch_size: 4, lr_scheduler: "constant", rank: 8, vectors: 1, sample_every: 50, seed: 0,
            warmup: 0, grad_accum: 1, noise_offset: 0, caption_dropout: 0, keep_tags: 0 },
};
let enabled = false;
let job = null;       // {id, events}: the training job shown
let records = [];     // its loss curve so far: [{step, loss}]
let samples = [];     // its sample sheets: [{step, url}]
let sampleIndex = -1;
let total = 0;
let loading = false;  // a log request is in flight (progress events come faster than the log needs reading)

const fields = () => [...document.querySelectorAll("#train-form [data-train]")];

function showError(message) {
  $("train-error").textContent = message;
  $("train-error").hidden = !message;
}

// -- the form ------------------------------------------------------------------------------------------------
function read() {
  const body = {};
  for (const e of fields()) {
    if (e.closest("[data-kinds]") && e.closest("[data-kinds]").dataset.kinds !== $("train-kind").value) continue;
    const name = e.dataset.train;
    if (e.type === "checkbox") body[name] = e.checked;
    else if (e.type === "number") { if (e.value.trim() !== "") body[name] = Number(e.value); }
    else if (name === "sample_prompts") body[name] = e.value.split("\n").map((l) => l.trim()).filter(Boolean);
    else if (e.value.trim() !== "") body[name] = e.value.trim();
  }
  return body;
}

function write(values) {
  for (const e of fields()) {
    const v = values[e.dataset.train];
    if (v === undefined) continue;
    if (e.type === "checkbox") e.checked = Boolean(v);
    else if (e.tagName === "SELECT" && ![...e.options].some((o) => o.value === String(v))) continue;
    else e.value = Array.isArray(v) ? v.join("\n") : v ?? "";
  }
}

function save() {
  const values = {};
  for (const e of fields()) values[e.dataset.train] = e.type === "checkbox" ? e.checked : e.value;
  try { localStorage.setItem(STORE_KEY, JSON.stringify(values)); } catch (e) { /* storage off: not kept */ }
}

function restore() {
  try { return JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { return null; }
}

// The kind's own fieldset is shown; steps and learning rate follow the kind unless the user changed them.
function setKind(kind, previous) {
  for (const f of document.querySelectorAll("#train-form [data-kinds]")) f.hidden = f.dataset.kinds !== kind;
  if (!previous || previous === kind) return;
  for (const key of ["steps", "lr"]) {
    const input = $(`train-${key}`);
    if (input.value === "" || Number(input.value) === DEFAULTS[previous][key]) input.value = DEFAULTS[kind][key];
  }
}

async function loadDatasets() {
  const select = $("train-dataset");
  const keep = select.value || (restore() || {}).dataset;
  try {
    const { datasets } = await api("/api/v1/train/datasets");
    if (!datasets.length) {
      select.replaceChildren(new Option("(no folders under the train root)", ""));
    } else {
      select.replaceChildren(...datasets.map((d) => new Option(`${d.name} (${d.images} images)`, d.name)));
      if (datasets.some((d) => d.name === keep)) select.value = keep;
    }
  } catch (e) {
    showError(e.message);
  }
}

// -- starting, following, cancelling -------------------------------------------------------------------------
async function start() {
  showError("");
  const name = $("train-name");
  if (!name.checkValidity()) {
    showError(name.value ? "Name: use letters, digits, _ and - (it is the file's name and what prompts call it)"
                         : "Name the result first (what prompts will call it)");
    name.focus();
    return;
  }
  save();
  $("train-start").disabled = true;
  try {
    const body = read();
    const summary = await api("/api/v1/train", { method: "POST", json: body });
    submitted(summary, `train ${body.kind} ${body.name} on ${body.dataset}`);  // listed in the queue too
    show(summary);
  } catch (e) {
    showError(e.message);
  } finally {
    $("train-start").disabled = !enabled;
  }
}

async function cancel() {
  if (!job) return;
  $("train-status").textContent = "Cancelling\u2026 (at the next step; the checkpoint is kept)";
  try {
    await api(`/api/v1/jobs/${job.id}`, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 409) showError(e.message);  // 409: it finished meanwhile
  }
}

// Show a training job (just submitted, or the newest after a reload) and follow it until it ends.
function show(summary) {
  if (job && job.events) job.events.close();
  job = { id: summary.id, events: null };
  records = [];
  samples = [];
  sampleIndex = -1;
  total = summary.total;
  $("train-result").hidden = true;
  $("train-strip").replaceChildren();
  $("train-sample").hidden = true;
  $("train-samples-empty").hidden = false;
  $("train-sample-step").textContent = "";
  drawCurve();
  update(summary);
  if (["done", "failed", "cancelled", "interrupted"].includes(summary.state)) {
    finish(summary);
    return;
  }
  const events = new EventSource(`/api/v1/jobs/${summary.id}/events`);
  job.events = events;
  events.addEventListener("progress", (e) => update(JSON.parse(e.data)));
  events.addEventListener("done", (e) => { events.close(); finish(JSON.parse(e.data)); });
  events.onerror = () => {  // the stream broke: look again in a moment
    events.close();
    setTimeout(async () => {
      if (!job || job.id !== summary.id) return;
      try { show(await api(`/api/v1/jobs/${summary.id}`)); } catch (e) { showError(e.message); }
    }, 2000);
  };
}

function update(p) {
  if (!job || p.id !== job.id) return;
  total = p.total || total;
  const open = p.state === "queued" || p.state === "running";
  $("train-cancel").disabled = !open;
  const fill = total ? Math.min(100, (100 * p.step) / total) : 0;
  $("train-fill").style.width = `${fill}%`;
  $("train-progress").dataset.state = p.state;
  const train = p.train || {};
  if (p.state === "queued") {
    $("train-status").textContent = p.position ? `Queued: ${p.position} job(s) ahead` : "Queued: next";
  } else if (p.state === "running") {
    const what = p.phase === "training" ? `Step ${p.step}/${total}` : p.phase === "loading_model" ?
      "Loading the model\u2026" : "Preparing the data\u2026";
    const loss = train.loss != null ? ` \u00b7 loss ${train.loss.toPrecision(3)}` : "";
    const eta = p.eta_s != null ? ` \u00b7 ${duration(p.eta_s)} left` : "";
    const resumed = train.resumed_from ? ` \u00b7 resumed at step ${train.resumed_from}` : "";
    $("train-status").textContent = what + loss + eta + resumed;
  }
  if (train.samples) showSamples(train.samples);
  if (p.step && (!records.length || records[records.length - 1].step < p.step)) loadLog();
}

function finish(summary) {
  update(summary);
  loadLog();
  const train = summary.train || {};
  if (train.samples) showSamples(train.samples);
  $("train-cancel").disabled = true;
  const state = summary.state;
  if (state === "done") {
    const r = train.result || {};
    $("train-fill").style.width = "100%";
    $("train-status").textContent = `Done: ${r.steps} steps` + (r.minutes != null ? ` in ${r.minutes} min` : "") +
      (r.last_loss != null ? `, last loss ${r.last_loss.toPrecision(3)}` : "");
    $("train-result-text").textContent = train.kind === "lora"
      ? `Saved ${train.file}: write ${train.use} in a prompt (the LoRA picker lists it).`
      : `Saved ${train.file}: write ${train.use} in a prompt.`;
    $("train-use").hidden = train.kind !== "lora";
    $("train-result").hidden = false;
    $("train-result").dataset.name = train.name;
    refreshLoras();
  } else if (state === "failed") {
    $("train-status").textContent = "Failed";
    showError(summary.error || "the training failed");
  } else {
    $("train-status").textContent = `Cancelled at step ${summary.step}/${summary.total}: the checkpoint is kept; ` +
      "start the same settings again to continue from it";
  }
  document.body.dataset.trained = summary.id;  // tests (and scripts) wait on this
}

async function loadLog() {
  if (!job || loading) return;
  loading = true;
  const id = job.id;
  try {
    const after = records.length ? records[records.length - 1].step : 0;
    const data = await api(`/api/v1/train/${id}/log?after=${after}`);
    if (job && job.id === id) {
      records.push(...data.records.filter((r) => typeof r.loss === "number"));
      drawCurve();
    }
  } catch (e) { /* the next progress event asks again */ } finally {
    loading = false;
  }
}

const duration = (s) => (s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);

// -- the loss curve: each step's loss as a faint line, a moving average over it ------------------------------
function drawCurve() {
  const box = $("train-curve");
  const W = 480, H = 200, left = 52, right = 12, top = 10, bottom = 26;
  const el = (name, attrs, text) => {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const pts = records.filter((r) => Number.isFinite(r.loss));
  const last = pts.length ? pts[pts.length - 1] : null;
  const label = last ? `loss per step: ${pts.length} steps, last ${last.loss.toPrecision(3)} at step ${last.step}`
                     : "loss per step: no steps yet";
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label });
  svg.append(el("rect", { x: left, y: top, width: W - left - right, height: H - top - bottom, class: "frame" }));
  const span = Math.max(total, last ? last.step : 1, 1);
  if (pts.length) {
    const losses = pts.map((r) => r.loss);
    const lo = Math.min(...losses), hi = Math.max(...losses);
    const range = hi - lo || Math.abs(hi) || 1;
    const x = (step) => left + (step / span) * (W - left - right);
    const y = (v) => H - bottom - ((v - lo) / range) * (H - top - bottom);
    const line = (values, cls) => el("polyline", {
      class: cls, points: values.map((v, i) => `${x(pts[i].step).toFixed(1)},${y(v).toFixed(1)}`).join(" ") });
    const half = Math.max(1, Math.round(pts.length / 30));  // a centred moving average: smooth, not lagging
    const smooth = losses.map((_, i) => {
      const part = losses.slice(Math.max(0, i - half), i + half + 1);
      return part.reduce((a, b) => a + b, 0) / part.length;
    });
    svg.append(line(losses, "raw"), line(smooth, "line"));
    if (pts.length === 1) svg.append(el("circle", { cx: x(pts[0].step), cy: y(pts[0].loss), r: 3, class: "dot" }));
    svg.append(el("text", { x: left - 4, y: top + 10, "text-anchor": "end" }, hi.toPrecision(3)));
    svg.append(el("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, lo.toPrecision(3)));
  } else {
    svg.append(el("text", { x: (left + W - right) / 2, y: H / 2, "text-anchor": "middle" }, "no steps yet"));
  }
  svg.append(el("text", { x: left, y: H - 8 }, "step 0"));
  svg.append(el("text", { x: W - right, y: H - 8, "text-anchor": "end" }, `step ${span}`));
  svg.append(el("text", { x: (left + W - right) / 2, y: H - 8, "text-anchor": "middle" }, "loss per step (line: moving average)"));
  box.replaceChildren(svg);
  box.dataset.points = String(pts.length);
}

// -- sample sheets: the newest shown large, every one a button in the strip ----------------------------------
function showSamples(list) {
  if (list.length === samples.length) return;
  const follow = sampleIndex === samples.length - 1;  // looking at the newest: keep following the newest
  samples = list;
  const strip = list.map((s, k) => {
    const b = Object.assign(document.createElement("button"), { type: "button", className: "frame" });
    const img = Object.assign(document.createElement("img"), { src: s.url, alt: `samples at step ${s.step}` });
    img.addEventListener("load", keepInView);
    b.append(img);
    b.title = `step ${s.step}`;
    b.addEventListener("click", () => showSample(k));
    return b;
  });
  $("train-strip").replaceChildren(...strip);
  $("train-samples-empty").hidden = list.length > 0;
  if (list.length) showSample(follow || sampleIndex < 0 ? list.length - 1 : sampleIndex);
}

function showSample(k) {
  const s = samples[k];
  if (!s) return;
  sampleIndex = k;
  const img = $("train-sample");
  img.src = s.url;
  img.alt = `sample images at step ${s.step}`;
  img.hidden = false;
  $("train-sample-step").textContent = `at step ${s.step}`;
  [...$("train-strip").children].forEach((b, j) => b.setAttribute("aria-pressed", String(j === k)));
  keepInView();
}

// The selected frame in the middle of the strip (horizontally only: the page does not jump); again as the
// thumbnails load, since their widths are known only then.
function keepInView() {
  const strip = $("train-strip");
  const frame = strip.children[sampleIndex];
  if (frame) strip.scrollLeft = Math.max(0, frame.offsetLeft - (strip.clientWidth - frame.offsetWidth) / 2);
}

function useLora() {
  const name = $("train-result").dataset.name;
  if (!name) return;
  addLora(name, 1);
  document.getElementById("tab-txt2img").click();
}

// -- start-up ----------------------------------------------------------------------------------------------------
export async function initTrain(config) {
  enabled = Boolean(config && config.training);
  $("train-off").hidden = enabled;
  for (const e of [$("train-start"), ...fields(), $("train-refresh")]) e.disabled = !enabled;
  const maxSteps = config && config.limits && config.limits.max_train_steps;
  if (maxSteps) $("train-steps").max = maxSteps;
  if (config && config.limits) $("train-batch_size").max = config.limits.max_batch;
  write({ ...DEFAULTS.common, ...DEFAULTS.lora });
  const saved = restore();
  if (saved) write(saved);
  setKind($("train-kind").value);
  let kind = $("train-kind").value;
  $("train-kind").addEventListener("change", () => {
    setKind($("train-kind").value, kind);
    kind = $("train-kind").value;
    save();
  });
  $("train-form").addEventListener("input", save);
  $("train-form").addEventListener("submit", (e) => { e.preventDefault(); start(); });
  $("train-start").addEventListener("click", start);
  $("train-cancel").addEventListener("click", cancel);
  $("train-refresh").addEventListener("click", loadDatasets);
  $("train-use").addEventListener("click", useLora);
  drawCurve();
  if (!enabled) return;
  await loadDatasets();
  try {  // after a reload: the newest training job again, followed if it still runs
    const [latest] = await api("/api/v1/jobs?kind=train&limit=1");
    if (latest) show(latest);
  } catch (e) {
    showError(`could not load the server's training jobs: ${e.message}`);
  }
}
