// Progress bar with live previews, the gallery of results with each image's parameters, and the full-size view.
import { $ } from "./form.js";

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
  else if (p.state === "running" && !p.step) text = "Starting\u2026";
  else if (p.state === "running" && p.phase === "inspecting") text = "Drawing what happened inside\u2026";
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
  $("open-full").hidden = true;
  $("viewer-empty").hidden = true;
}

export function clearPreview() {
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  if (selected) $("open-full").hidden = false;
}

// The images of finished jobs as /ui/jobs/{id} gives them (URLs, parameters, A1111 texts), oldest job first, at
// the gallery's front; `show` selects the newest (a job that finished while another one is followed does not
// take the view away from it).
export function addJobResults(jobs, show = true) {
  const added = [];
  for (const job of jobs) {
    added.unshift(...(job.images || []).map((url, i) => ({
      jobId: job.id, index: i, url, params: (job.params || [])[i] || {},
      infotext: (job.infotexts || [])[i] || JSON.stringify((job.params || [])[i] || {}, null, 1),
    })));
  }
  if (!added.length) return;
  results.unshift(...added);
  results.length = Math.min(results.length, MAX_KEPT);
  renderGallery();
  const newest = added.find((r) => r.index === 0);  // the first image of the newest job
  if (show || !selected) select(newest);
}

// Show the first image of a job (a click on a finished job in the queue list).
export function showJob(jobId) {
  const r = results.find((x) => x.jobId === jobId && x.index === 0);
  if (r) select(r);
}

function renderGallery() {
  const thumbs = results.map((r) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.title = `seed ${r.params.seed}`;
    button.dataset.job = r.jobId;
    button.dataset.index = r.index;
    const img = Object.assign(document.createElement("img"), { src: r.url, alt: `result ${r.index + 1}` });
    button.append(img);
    button.addEventListener("click", () => select(r));
    return button;
  });
  $("gallery").replaceChildren(...thumbs);
  if (selected) markSelected();
}

const isSmall = (r) => Math.max(r.params.width || 0, r.params.height || 0) < 256;  // drawn with whole pixels

function select(r) {
  selected = r;
  const img = $("selected-image");
  img.src = r.url;
  img.alt = `result ${r.index + 1}, seed ${r.params.seed}: open full size`;
  img.classList.toggle("pixelated", isSmall(r));
  $("open-full").hidden = !$("preview").hidden;
  $("viewer-empty").hidden = true;
  $("infotext").textContent = r.infotext;
  $("image-info").hidden = false;
  const download = $("download");
  download.href = r.url;
  download.download = `easel-${r.params.seed ?? r.jobId}-${r.index}.png`;
  markSelected();
  if ($("lightbox").open) showFull(r);
}

function markSelected() {
  for (const thumb of $("gallery").children) {
    const on = thumb.dataset.job === selected.jobId && Number(thumb.dataset.index) === selected.index;
    thumb.classList.toggle("selected", on);
    thumb.setAttribute("aria-pressed", String(on));
  }
}

// -- full-size view: a modal <dialog> (focus stays inside; Esc closes it natively) --------------------------
function showFull(r) {
  const img = $("lightbox-image");
  img.src = r.url;
  img.alt = `result ${r.index + 1} of job ${r.jobId}`;
  img.classList.toggle("pixelated", isSmall(r));
  const size = r.params.width ? ` \u00b7 ${r.params.width}\u00d7${r.params.height}` : "";
  $("lightbox-caption").textContent = `Seed ${r.params.seed}${size} \u00b7 ${results.indexOf(r) + 1}/${results.length}`;
}

function openFull() {
  if (!selected) return;
  showFull(selected);
  $("lightbox").showModal();
  $("lightbox-close").focus();
}

function step(delta) {
  const i = results.indexOf(selected);
  if (i < 0 || !results.length) return;
  select(results[(i + delta + results.length) % results.length]);
}

function initLightbox() {
  const box = $("lightbox");
  $("open-full").addEventListener("click", openFull);
  $("lightbox-close").addEventListener("click", () => box.close());
  $("lightbox-prev").addEventListener("click", () => step(-1));
  $("lightbox-next").addEventListener("click", () => step(1));
  box.addEventListener("click", (e) => { if (e.target === box) box.close(); });  // a click on the backdrop
  box.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") step(-1);
    else if (e.key === "ArrowRight") step(1);
  });
  box.addEventListener("close", () => $("open-full").focus());  // back where the user was
}

// The "send to ..." buttons under the selected image call onSend(target, result).
export function initGallery(onSend) {
  initLightbox();
  for (const target of ["img2img", "inpaint", "outpaint"]) {
    $(`send-${target}`).addEventListener("click", () => { if (selected) onSend(target, selected); });
  }
}
