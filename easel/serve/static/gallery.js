// Progress bar with live previews, and the gallery of results with each image's parameters.
import { $, api, apiUrl } from "./form.js";

const MAX_KEPT = 200;  // images kept in the page's gallery (the server keeps its own finished jobs)
const results = [];    // newest first: {jobId, index, url, params, infotext}
let selected = null;

export function selectedResult() { return selected; }
export function lastResult() { return results[0] || null; }

function formatSeconds(s) {
  if (s == null) return "";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// A progress event {state, step, total, eta_s, position} -> the bar and its line of text.
export function showProgress(p) {
  $("progress").hidden = false;
  const fraction = p.total ? Math.min(1, p.step / p.total) : 0;
  $("progress-fill").style.width = `${(fraction * 100).toFixed(1)}%`;
  let text;
  if (p.state === "queued") text = p.position ? `Queued: ${p.position} job(s) ahead` : "Queued: next";
  else if (p.state === "running" && !p.step) text = "Starting (loading the model the first time)\u2026";
  else if (p.state === "running") {
    text = `Step ${p.step}/${p.total}`;
    if (p.eta_s != null) text += ` \u00b7 ETA ${formatSeconds(p.eta_s)}`;
  } else text = p.state;
  $("progress-text").textContent = text;
  $("progress").dataset.state = p.state;
}

export function setProgressText(text, state) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  if (state) $("progress").dataset.state = state;
}

export function showPreview(base64png) {
  const img = $("preview");
  img.src = "data:image/png;base64," + base64png;
  img.hidden = false;
  $("selected-image").hidden = true;
  $("viewer-empty").hidden = true;
}

export function clearPreview() {
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  if (selected) $("selected-image").hidden = false;
}

// The images of a finished job (the `done` event), with their A1111 parameters text, at the gallery's front.
export async function addJobResults(job) {
  if (!job.images || !job.images.length) return [];
  let infotexts = [];
  try {
    infotexts = (await api(`/ui/jobs/${job.id}/infotext`)).infotexts;
  } catch (e) { /* the parameters are still shown from the JSON below */ }
  const added = job.images.map((url, i) => ({
    jobId: job.id, index: i, url, params: job.params[i] || {},
    infotext: infotexts[i] || JSON.stringify(job.params[i] || {}, null, 1),
  }));
  results.unshift(...added);
  results.length = Math.min(results.length, MAX_KEPT);
  renderGallery();
  select(added[0]);
  return added;
}

function renderGallery() {
  const thumbs = results.map((r) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.title = `seed ${r.params.seed}`;
    button.dataset.job = r.jobId;
    button.dataset.index = r.index;
    const img = Object.assign(document.createElement("img"), { src: apiUrl(r.url), alt: `result ${r.index + 1}` });
    button.append(img);
    button.addEventListener("click", () => select(r));
    return button;
  });
  $("gallery").replaceChildren(...thumbs);
}

function select(r) {
  selected = r;
  const img = $("selected-image");
  img.src = apiUrl(r.url);
  img.hidden = !$("preview").hidden;
  img.classList.toggle("pixelated", Math.max(r.params.width || 0, r.params.height || 0) < 256);
  $("viewer-empty").hidden = true;
  $("infotext").textContent = r.infotext;
  $("image-info").hidden = false;
  const download = $("download");
  download.href = apiUrl(r.url);
  download.download = `easel-${r.params.seed ?? r.jobId}-${r.index}.png`;
  for (const thumb of $("gallery").children) {
    thumb.classList.toggle("selected", thumb.dataset.job === r.jobId && Number(thumb.dataset.index) === r.index);
  }
}

// The "send to ..." buttons under the selected image call onSend(target, result).
export function initGallery(onSend) {
  for (const target of ["img2img", "inpaint", "outpaint"]) {
    $(`send-${target}`).addEventListener("click", () => { if (selected) onSend(target, selected); });
  }
}
