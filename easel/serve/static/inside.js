// The Inside tab: what happened inside a job made with "Capture inside" (the native API's GET .../inside): its
// film strip with a step slider, the schedule (an inline SVG), per-token attention maps over the image and the
// token table. Every picture is drawn by the server from the same captured run.
import { $, api } from "./form.js";

const SVG = "http://www.w3.org/2000/svg";
const known = new Map();  // job id -> {id, prompt, url}: finished jobs that have a capture, newest last
let shown = null;         // the capture on screen (the API's JSON) and what is selected in it
let passIndex = 0;

// Finished jobs (as /ui/jobs gives them): the ones with a capture join the Job list; the newest is shown.
export function addInsideJobs(jobs) {
  const fresh = jobs.filter((j) => j.inside && !known.has(j.id));
  if (!fresh.length) return;
  for (const j of fresh) {
    known.set(j.id, { id: j.id, prompt: j.prompt || (j.request && j.request.prompt) || "", url: j.inside });
  }
  const select = $("inside-job");
  select.replaceChildren(...[...known.values()].reverse().map((j) => new Option(label(j), j.id)));
  showInside(fresh[fresh.length - 1].id);
}

// "prompt (cut) · 000012": the prompt and the start of the job's id (which counts up)
function label(j) {
  const prompt = j.prompt.length > 48 ? j.prompt.slice(0, 47) + "\u2026" : j.prompt || "(no prompt)";
  return `${prompt} \u00b7 ${j.id.slice(0, 6)}`;
}

// Load and draw one job's capture.
export async function showInside(jobId) {
  const job = known.get(jobId);
  if (!job) return;
  $("inside-job").value = jobId;
  $("inside-status").textContent = "Loading\u2026";
  let data;
  try {
    data = await api(job.url);
  } catch (e) {
    $("inside-status").textContent = e.message;  // e.g. 410: the server no longer keeps this capture
    return;
  }
  shown = data;
  $("inside-status").textContent = "";
  $("inside-empty").hidden = true;
  $("inside-content").hidden = false;
  $("inside-content").classList.toggle("small", Math.max(data.width, data.height) < 256);  // whole pixels
  const passes = data.passes.map((p, i) => new Option(p.phase ? `${i + 1}: ${p.phase}` : `${i + 1}`, String(i)));
  $("inside-pass").replaceChildren(...passes);
  $("inside-pass-label").hidden = passes.length < 2;
  showPass(0);
  showTokens(data);
  showTable(data);
  document.body.dataset.inside = data.id;  // tests (and scripts) wait on this
}

// -- the film strip ------------------------------------------------------------------------------------------
function showPass(i) {
  passIndex = i;
  $("inside-pass").value = String(i);
  const pass = shown.passes[i];
  const slider = $("inside-step");
  slider.max = String(Math.max(0, pass.steps.length - 1));
  slider.disabled = pass.steps.length < 2;
  const strip = pass.steps.map((s, k) => {
    const button = Object.assign(document.createElement("button"), { type: "button", className: "frame" });
    button.append(Object.assign(document.createElement("img"), { src: s.x0, alt: `x0 at step ${s.i + 1}` }));
    button.title = `step ${s.i + 1}, sigma ${s.sigma.toPrecision(3)}`;
    button.addEventListener("click", () => showStep(k));
    return button;
  });
  $("inside-strip").replaceChildren(...strip);
  drawSchedule(pass);
  showStep(pass.steps.length - 1);
}

function showStep(k) {
  const pass = shown.passes[passIndex];
  const s = pass.steps[k];
  if (!s) return;
  $("inside-step").value = String(k);
  const where = `step ${s.i + 1}/${pass.total_steps}`;
  $("inside-step-text").textContent = `${s.i + 1}/${pass.total_steps} \u00b7 sigma ${s.sigma.toPrecision(3)}`;
  $("inside-step").setAttribute("aria-valuetext", `${where}, sigma ${s.sigma.toPrecision(3)}`);
  for (const kind of ["x0", "latent", "noise"]) {
    const img = $(`inside-${kind}`);
    img.src = s[kind];
    img.alt = `${kind === "x0" ? "x0 prediction" : kind === "latent" ? "noisy latent" : "predicted noise"} at ${where}`;
  }
  const strip = $("inside-strip");
  [...strip.children].forEach((b, j) => b.setAttribute("aria-pressed", String(j === k)));
  const frame = strip.children[k];  // kept in view (horizontally only: the page does not jump)
  if (frame) strip.scrollLeft = Math.max(0, frame.offsetLeft - (strip.clientWidth - frame.offsetWidth) / 2);
  const marker = document.querySelector("#inside-schedule .now");
  if (marker) {
    marker.setAttribute("cx", marker.dataset[`x${s.i}`] || 0);
    marker.setAttribute("cy", marker.dataset[`y${s.i}`] || 0);
  }
}

// sigma per step on a log scale (one dot per step, the final 0 left out); the current step is ringed.
function drawSchedule(pass) {
  const sigmas = pass.sigmas.filter((v) => v > 0);
  const box = $("inside-schedule");
  if (!sigmas.length) { box.replaceChildren(); return; }
  const W = 320, H = 150, left = 44, right = 10, top = 10, bottom = 24;
  const lo = Math.log10(Math.min(...sigmas)), hi = Math.log10(Math.max(...sigmas));
  const span = hi - lo || 1, n = Math.max(sigmas.length - 1, 1);
  const x = (j) => left + (j / n) * (W - left - right);
  const y = (v) => H - bottom - ((Math.log10(v) - lo) / span) * (H - top - bottom);
  const el = (name, attrs, text) => {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const first = sigmas[0].toPrecision(3), last = sigmas[sigmas.length - 1].toPrecision(3);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                          "aria-label": `sigma per step, log scale: ${sigmas.length} steps from ${first} to ${last}` });
  svg.append(el("rect", { x: left, y: top, width: W - left - right, height: H - top - bottom, class: "frame" }));
  const points = sigmas.map((v, j) => `${x(j).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  svg.append(el("polyline", { points, class: "line" }));
  const marker = el("circle", { r: 6, class: "now" });
  sigmas.forEach((v, j) => {
    svg.append(el("circle", { cx: x(j).toFixed(1), cy: y(v).toFixed(1), r: 2.5, class: "dot" }));
    marker.dataset[`x${j}`] = x(j).toFixed(1);
    marker.dataset[`y${j}`] = y(v).toFixed(1);
  });
  svg.append(marker);
  svg.append(el("text", { x: left - 4, y: y(sigmas[0]) + 4, "text-anchor": "end" }, first));
  svg.append(el("text", { x: left - 4, y: y(sigmas[sigmas.length - 1]) + 4, "text-anchor": "end" }, last));
  svg.append(el("text", { x: left, y: H - 6 }, "step 1"));
  svg.append(el("text", { x: W - right, y: H - 6, "text-anchor": "end" }, `step ${sigmas.length}`));
  svg.append(el("text", { x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle" }, "sigma (log)"));
  box.replaceChildren(svg);
}

// -- attention maps ------------------------------------------------------------------------------------------
function showTokens(data) {
  const box = $("inside-tokens");
  const attn = data.attention;
  if (!attn) {
    box.replaceChildren(Object.assign(document.createElement("p"), { className: "muted",
      textContent: "This model's UNet has no cross-attention layers: there are no token maps." }));
    showMap(null, data.image, "the image");
    return;
  }
  const image = { key: "image", text: "image", map: data.image, caption: "the image" };
  const choices = [image].concat(attn.tokens.map((t) => ({
    key: String(t.position), text: t.piece, map: t.map, pos: t.position,
    caption: `token ${t.position}: ${t.piece}` + (t.weight !== 1 ? ` (weight ${t.weight.toFixed(2)})` : ""),
  })));
  const buttons = choices.map((t) => {
    const b = Object.assign(document.createElement("button"), { type: "button", className: "token" });
    b.dataset.key = t.key;
    if (t.pos !== undefined) {
      b.append(Object.assign(document.createElement("span"), { className: "pos", textContent: t.pos }));
    }
    b.append(t.text);
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => showMap(t.key, t.map, t.caption));
    return b;
  });
  box.replaceChildren(...buttons);
  const first = attn.tokens.find((t) => t.kind === "token" || t.kind === "embedding");
  if (first) showMap(String(first.position), first.map, `token ${first.position}: ${first.piece}`);
  else showMap("image", data.image, "the image");
}

function showMap(key, url, caption) {
  const img = $("inside-map");
  img.src = url;
  img.alt = key === "image" || key === null ? "the generated image" : `attention map of ${caption}, over the image`;
  $("inside-map-caption").textContent = key === "image" || key === null ? "The image" :
    `Where the UNet looked at ${caption} (bright: more attention), averaged over heads, layers and steps`;
  for (const b of $("inside-tokens").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(b.dataset.key === key));
  }
}

// -- the token table (the same rows as `easel inspect tokens --json`) ------------------------------------------
function showTable(data) {
  const used = {};
  for (const r of data.tokens) if (r.kind !== "pad") used[r.chunk] = (used[r.chunk] || 0) + 1;
  const rows = data.tokens.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.kind = r.kind;
    const piece = r.kind === "pad" ? `${r.piece} \u00d7${data.slots_per_chunk - used[r.chunk]}` : r.piece;
    const cells = [r.position, r.id, piece, r.word_text, r.weight.toFixed(2), r.token_norm.toFixed(2),
                   r.context_norm.toFixed(2), r.cos_clip_skip.toFixed(3)];
    tr.append(...cells.map((v) => Object.assign(document.createElement("td"), { textContent: v })));
    return tr;
  });
  $("inside-table").tBodies[0].replaceChildren(...rows);
}

export function initInside() {
  $("inside-job").addEventListener("change", (e) => showInside(e.target.value));
  $("inside-pass").addEventListener("change", (e) => showPass(Number(e.target.value)));
  $("inside-step").addEventListener("input", (e) => showStep(Number(e.target.value)));
}
