// The Animate tab: `easel animate` as a job (POST /api/v1/animate): prompts travelled between at keyframes,
// Deforum-style motion schedules, the format. A frame counter and each frame as it is made while it runs; the
// animation itself (GIF / WebP as an image, MP4 as a video), the frames and a download when it is done.
import { $, api } from "./form.js";
import { submitted } from "./jobs.js";
import { FINISHED, cancelTask, followJob, inlineError, latestJob, seconds, setBar } from "./tasks.js";

const STORE_KEY = "easel.animate";
const DEFAULTS = { frames: 16, format: "gif", seed: -1, ms: 125, color_coherence: true, steps: 20, cfg_scale: 7 };
let job = null;   // {id, stop, frames, format}: the animation shown
let frameUrls = [];

const fields = () => [...document.querySelectorAll("#animate-view [data-anim]")];
const showError = (message) => inlineError("anim", message);

// -- the form ------------------------------------------------------------------------------------------------
function numbers(text, what) {
  if (!text.trim()) return undefined;
  const values = text.split(",").map((v) => v.trim()).filter(Boolean).map(Number);
  if (values.some((v) => !Number.isInteger(v))) throw new Error(`${what}: whole numbers separated by commas, e.g. 0,12,24`);
  return values;
}

function read() {
  const body = {};
  for (const e of fields()) {
    const name = e.dataset.anim;
    if (e.type === "checkbox") body[name] = e.checked;
    else if (e.type === "number") { if (e.value.trim() !== "") body[name] = Number(e.value); }
    else if (name === "prompts") body.prompts = e.value.split("\n").map((l) => l.trim()).filter(Boolean);
    else if (name === "keyframes" || name === "seeds") {
      const list = numbers(e.value, name === "seeds" ? "Seeds" : "Keyframes");
      if (list) body[name] = list;
    } else if (e.value.trim() !== "") body[name] = e.value.trim();
  }
  if (!body.prompts || !body.prompts.length) throw new Error("write at least one prompt (one per line: the animation travels from each to the next)");
  return body;
}

function write(values) {
  for (const e of fields()) {
    const v = values[e.dataset.anim];
    if (v === undefined) continue;
    if (e.type === "checkbox") e.checked = Boolean(v);
    else if (e.tagName === "SELECT" && ![...e.options].some((o) => o.value === String(v))) continue;
    else e.value = Array.isArray(v) ? v.join(e.dataset.anim === "prompts" ? "\n" : ",") : v ?? "";
  }
}

function save() {
  const values = {};
  for (const e of fields()) values[e.dataset.anim] = e.type === "checkbox" ? e.checked : e.value;
  try { localStorage.setItem(STORE_KEY, JSON.stringify(values)); } catch (e) { /* storage off: not kept */ }
}

function restore() {
  try { return JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { return null; }
}

// -- running ---------------------------------------------------------------------------------------------------
async function start() {
  showError("");
  let body;
  try { body = read(); } catch (e) { showError(e.message); $("anim-prompts").focus(); return; }
  save();
  $("anim-start").disabled = true;
  try {
    const summary = await api("/api/v1/animate", { method: "POST", json: body });
    submitted(summary, summary.task.label);  // listed in the queue too
    show(summary);
  } catch (e) {
    showError(e.message);
  } finally {
    $("anim-start").disabled = false;
  }
}

// Show an animation job (just queued, or the newest after a reload) and follow it until it ends.
function show(summary) {
  if (job && job.stop) job.stop();
  const task = summary.task || {};
  job = { id: summary.id, stop: null, frames: task.frames || summary.total, format: task.format };
  frameUrls = [];
  $("anim-strip").replaceChildren();
  $("anim-result").hidden = true;
  $("anim-video").hidden = true;
  $("anim-video").removeAttribute("src");
  update(summary);
  if (FINISHED.includes(summary.state)) { finish(summary); return; }
  job.stop = followJob(summary.id, {
    onProgress: update,
    onPreview: (png) => showImage(`data:image/png;base64,${png}`, "the newest frame"),
    onDone: finish,
  });
}

function update(p) {
  if (!job || p.id !== job.id) return;
  const task = p.task || {};
  const total = task.frames || p.total || job.frames || 0;
  const made = task.frames_done ?? p.step ?? 0;
  $("anim-counter").value = `${made} / ${total}`;
  $("anim-cancel").disabled = FINISHED.includes(p.state);
  setBar("anim", p.state, made, total);
  let text = p.state;
  if (p.state === "queued") text = p.position ? `Queued: ${p.position} job(s) ahead` : "Queued: next";
  else if (p.state === "running" && p.phase === "loading_model") text = "Loading the model\u2026";
  else if (p.state === "running") {
    text = `Frame ${Math.min(made + 1, total)} of ${total}`;
    if (task.frame_step) text += ` \u00b7 step ${task.frame_step}`;
    if (p.eta_s != null) text += ` \u00b7 ${seconds(p.eta_s)} left`;
  }
  $("anim-status").textContent = text;
  if (task.frame_urls) showFrames(task.frame_urls);
}

function finish(summary) {
  if (!job || summary.id !== job.id) return;
  update(summary);
  const task = summary.task || {};
  $("anim-cancel").disabled = true;
  if (summary.state === "failed") {
    $("anim-status").textContent = "Failed";
    showError(summary.error || "the animation failed");
  } else if (task.animation) {
    const made = task.frames_done;
    $("anim-status").textContent = summary.state === "done"
      ? `Done: ${made} frames` + (summary.finished && summary.started ? ` in ${seconds(summary.finished - summary.started)}` : "")
      : `${summary.state[0].toUpperCase()}${summary.state.slice(1)}: kept the ${made} frame(s) made`;
    $("anim-download").href = task.animation;
    $("anim-download").download = `easel-${summary.id}.${task.format}`;
    const s = task.smoothness;
    $("anim-smooth").textContent = s && made > 1
      ? `largest frame-to-frame change ${s.largest_step.toFixed(1)}, first to last ${s.first_to_last.toFixed(1)} (mean |\u0394pixel|)` : "";
    $("anim-result").hidden = false;
    job.format = task.format;
    job.animation = task.animation;
    play();
  } else {
    $("anim-status").textContent = `${summary.state[0].toUpperCase()}${summary.state.slice(1)} before the first frame`;
  }
  document.body.dataset.animated = summary.id;  // tests (and scripts) wait on this
}

function showImage(src, alt) {
  const img = $("anim-view");
  img.src = src;
  img.alt = alt;
  img.hidden = false;
  $("anim-video").hidden = true;
  $("anim-empty").hidden = true;
}

// The animation: MP4 in a <video> (muted, so that browsers let it play by itself), GIF / WebP as an image.
function play() {
  if (!job || !job.animation) return;
  for (const b of $("anim-strip").children) b.setAttribute("aria-pressed", "false");
  if (job.format === "mp4") {
    const video = $("anim-video");
    video.src = job.animation;
    video.hidden = false;
    $("anim-view").hidden = true;
    $("anim-empty").hidden = true;
    video.play().catch(() => {});
  } else {
    showImage(job.animation, "the animation");
  }
}

function showFrames(urls) {
  if (urls.length === frameUrls.length) return;
  const strip = $("anim-strip");
  for (let n = frameUrls.length; n < urls.length; n++) {
    const b = Object.assign(document.createElement("button"), { type: "button", className: "frame", title: `frame ${n}` });
    b.setAttribute("aria-pressed", "false");
    const img = Object.assign(document.createElement("img"), { src: urls[n], alt: `frame ${n}` });
    b.append(img);
    b.addEventListener("click", () => {
      showImage(urls[n], `frame ${n}`);
      for (const other of strip.children) other.setAttribute("aria-pressed", String(other === b));
    });
    strip.append(b);
  }
  frameUrls = urls.slice();
  strip.scrollLeft = strip.scrollWidth;  // follow the newest frame
}

// -- start-up ----------------------------------------------------------------------------------------------------
export async function initAnimate(samplers, config) {
  const pick = $("anim-sampler");
  const d = (config && config.defaults) || {};
  pick.replaceChildren(...samplers.map((s) => new Option(s.label, s.name, false, s.name === d.sampler)));
  const model = (config && config.model) || {};
  write({ ...DEFAULTS, sampler: d.sampler, width: model.default_size, height: model.default_size,
          prompts: ["a red circle", "a blue square"] });
  if (config && config.limits) $("anim-steps").max = config.limits.max_steps;
  const saved = restore();
  if (saved) write(saved);
  $("anim-form").addEventListener("input", save);
  for (const id of ["anim-prompts", "anim-negative_prompt"]) {
    $(id).addEventListener("input", save);
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) start(); });
  }
  $("anim-form").addEventListener("submit", (e) => { e.preventDefault(); start(); });
  $("anim-start").addEventListener("click", start);
  $("anim-cancel").addEventListener("click", () => {
    if (!job) return;
    $("anim-status").textContent = "Cancelling\u2026 (the frames made are kept)";
    cancelTask(job.id, showError);
  });
  $("anim-play").addEventListener("click", play);
  const latest = await latestJob("animate");  // after a reload: the newest animation, followed if it still runs
  if (latest) show(latest);
}
