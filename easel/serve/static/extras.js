// The Extras tab: upscale an image (POST /api/v1/extras) with an upscaler the server lists (GET /api/v1/upscalers:
// lanczos, nearest, the upscaler files in its model folders) by a scale; the result with its size and a download.
import { $, api, fileDrop } from "./form.js";
import { submitted } from "./jobs.js";
import { FINISHED, cancelTask, followJob, inlineError, latestJob, setBar } from "./tasks.js";

let source = null;  // {dataUrl, width, height, name} of the chosen image
let job = null;     // {id, stop}
const showError = (message) => inlineError("extras", message);

function readFile(file) {
  return new Promise((resolve, reject) => {
    if (!file.type.startsWith("image/")) { reject(new Error(`${file.name || "that file"} is not an image`)); return; }
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name || "the file"}`));
    reader.readAsDataURL(file);
  });
}

async function choose(file) {
  showError("");
  try {
    const dataUrl = await readFile(file);
    const img = $("extras-source");
    img.src = dataUrl;
    await img.decode();
    img.hidden = false;
    source = { dataUrl, width: img.naturalWidth, height: img.naturalHeight, name: file.name || "image" };
    describeSize();
  } catch (e) {
    showError(e.message);
  }
}

// "20×12 → 40×24": what the scale makes of the chosen image.
function describeSize() {
  if (!source) return;
  const scale = Number($("extras-scale").value) || 0;
  const w = Math.max(1, Math.round(source.width * scale)), h = Math.max(1, Math.round(source.height * scale));
  $("extras-source-size").textContent = `${source.width}\u00d7${source.height} \u2192 ${w}\u00d7${h}`;
}

async function start() {
  showError("");
  if (!source) { showError("choose an image first: drop it on the box, or click the box to pick a file"); $("extras-drop").focus(); return; }
  const scale = Number($("extras-scale").value);
  if (!(scale > 0)) { showError("Scale: a number above 0, e.g. 2"); $("extras-scale").focus(); return; }
  $("extras-start").disabled = true;
  try {
    const summary = await api("/api/v1/extras", { method: "POST",
      json: { image: source.dataUrl, upscaler: $("extras-upscaler").value, scale } });
    submitted(summary, summary.task.label);
    show(summary);
  } catch (e) {
    showError(e.message);
  } finally {
    $("extras-start").disabled = false;
  }
}

function show(summary) {
  if (job && job.stop) job.stop();
  job = { id: summary.id, stop: null };
  $("extras-done").hidden = true;
  update(summary);
  if (FINISHED.includes(summary.state)) { finish(summary); return; }
  job.stop = followJob(summary.id, { onProgress: update, onDone: finish });
}

function update(p) {
  if (!job || p.id !== job.id) return;
  $("extras-cancel").disabled = FINISHED.includes(p.state);
  setBar("extras", p.state, p.step, p.total);
  const task = p.task || {};
  let text = p.state;
  if (p.state === "queued") text = p.position ? `Queued: ${p.position} job(s) ahead` : "Queued: next";
  else if (p.state === "running") text = p.total > 1 ? `Upscaling: tile ${p.step} of ${p.total}` : "Upscaling\u2026";
  if (task.output_size && p.state !== "done") text += ` (to ${task.output_size.join("\u00d7")})`;
  $("extras-status").textContent = text;
}

function finish(summary) {
  if (!job || summary.id !== job.id) return;
  update(summary);
  $("extras-cancel").disabled = true;
  const task = summary.task || {};
  if (summary.state === "done" && task.image) {
    const [w, h] = task.output_size;
    $("extras-status").textContent = `Done: ${w}\u00d7${h} with ${task.upscaler}`;
    const img = $("extras-result");
    img.src = task.image;
    img.classList.toggle("pixelated", task.upscaler === "nearest");
    $("extras-open").href = task.image;
    $("extras-open").hidden = false;
    $("extras-empty").hidden = true;
    $("extras-download").href = task.image;
    $("extras-download").download = `easel-upscaled-${summary.id}.png`;
    $("extras-size").textContent = `${task.input_size.join("\u00d7")} \u2192 ${w}\u00d7${h} (${task.upscaler}, \u00d7${task.scale})`;
    $("extras-done").hidden = false;
  } else if (summary.state === "failed") {
    $("extras-status").textContent = "Failed";
    showError(summary.error || "the upscale failed");
  } else {
    $("extras-status").textContent = `${summary.state[0].toUpperCase()}${summary.state.slice(1)}`;
  }
  document.body.dataset.upscaled = summary.id;  // tests (and scripts) wait on this
}


// The upscaler list: lanczos first (needs no file), then the server's files with their scale.
export async function initExtras() {
  const pick = $("extras-upscaler");
  try {
    const list = await api("/api/v1/upscalers");
    pick.replaceChildren(...list.map((u) => new Option(u.kind === "model" ? `${u.name} (${u.scale}\u00d7 model)` : u.name, u.name)));
  } catch (e) {
    pick.replaceChildren(new Option("lanczos", "lanczos"));
    showError(`could not list the server's upscalers: ${e.message}`);
  }
  $("extras-file").addEventListener("change", (e) => { if (e.target.files[0]) choose(e.target.files[0]); });
  fileDrop($("extras-drop"), choose);
  $("extras-drop").tabIndex = 0;  // the box opens the file chooser from the keyboard too
  $("extras-drop").addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("extras-file").click(); }
  });
  $("extras-scale").addEventListener("input", describeSize);
  $("extras-start").addEventListener("click", start);
  $("extras-cancel").addEventListener("click", () => { if (job) cancelTask(job.id, showError); });
  const latest = await latestJob("extras");
  if (latest && latest.task && latest.task.upscaler) show(latest);  // native upscales (A1111's carry no URL)
}
