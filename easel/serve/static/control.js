// The ControlNet panel: up to three units, each a ControlNet from the server's folders, a control image (uploaded,
// or drawn white on black on a small canvas, or both: strokes go over the upload), a preprocessor with a preview of
// its hint, and how strongly and when the unit applies. Sent as the request's `controlnets` (ControlUnit fields).
import { $, api } from "./form.js";

export const UNITS = 3;
const STORE_KEY = "easel.controlnet";
const MAX_STORED_IMAGE = 400_000;  // characters of a data URL kept across reloads (localStorage holds ~5 MB)
const DRAW_SIZE = 512;  // the drawing canvas's side when the form leaves the size to the model
const MODES = [["balanced", "Balanced"], ["prompt", "My prompt is more important"],
               ["control", "ControlNet is more important"]];
const RESIZES = [["crop_and_resize", "Crop and resize"], ["just_resize", "Just resize"],
                 ["resize_and_fill", "Resize and fill"]];
const units = [];  // per unit: {root, field(name), canvas, hasImage, painting, last, undo}
let preprocessors = [];
let onChange = () => {};

const option = ([value, label]) => new Option(label, value);

// One unit's controls (ids cn{i}-{field}: labels, tests and screenshots find them).
function unitHtml(i) {
  return `
  <details class="cn-unit" id="cn${i}" ${i === 0 ? "open" : ""}>
    <summary>Unit ${i} <span class="muted" id="cn${i}-state"></span></summary>
    <label class="check"><input type="checkbox" id="cn${i}-enabled"> Enabled</label>
    <label>Model <select id="cn${i}-model"></select></label>
    <div class="cn-images">
      <div>
        <div class="cn-canvas-wrap">
          <canvas id="cn${i}-canvas" width="1" height="1" hidden
                  aria-label="Control image of unit ${i}: drag to draw white strokes"></canvas>
          <p id="cn${i}-empty" class="muted">No control image: upload one or draw</p>
        </div>
      </div>
      <figure class="cn-hint">
        <img id="cn${i}-hint" alt="preprocessed hint of unit ${i}" hidden>
        <figcaption id="cn${i}-hint-text" class="muted" role="status"></figcaption>
      </figure>
    </div>
    <div class="tool-row cn-tools">
          <label class="button" for="cn${i}-file" tabindex="0" role="button" id="cn${i}-upload">Upload
            <input type="file" id="cn${i}-file" accept="image/*"></label>
          <button type="button" id="cn${i}-draw" title="Start a black canvas to draw on (white strokes)">Draw</button>
          <label class="inline">Brush <input type="range" id="cn${i}-brush" min="1" max="64" value="12"></label>
          <button type="button" id="cn${i}-undo">Undo</button>
          <button type="button" id="cn${i}-clear" title="Remove the control image">Remove</button>
    </div>
    <div class="grid2">
      <label>Preprocessor <select id="cn${i}-preprocessor"></select></label>
      <button type="button" id="cn${i}-preview" class="cn-preview" title="Show the hint this preprocessor makes of the image">Preview</button>
      <label>Threshold A <input type="number" id="cn${i}-threshold_a" step="any"></label>
      <label>Threshold B <input type="number" id="cn${i}-threshold_b" step="any"></label>
      <label>Weight <input type="number" id="cn${i}-weight" min="0" max="2" step="0.05" value="1"></label>
      <label>Control mode <select id="cn${i}-control_mode"></select></label>
      <label>Guidance start <input type="number" id="cn${i}-guidance_start" min="0" max="1" step="0.05" value="0"></label>
      <label>Guidance end <input type="number" id="cn${i}-guidance_end" min="0" max="1" step="0.05" value="1"></label>
      <label>Resize mode <select id="cn${i}-resize_mode"></select></label>
    </div>
  </details>`;
}

// Build the units and fill their lists; `save` is called whenever a unit changes.
export function initControl(controlnets, preprocessorList, save) {
  preprocessors = preprocessorList;
  onChange = save;
  const names = controlnets.map((c) => c.name);
  $("cn-none").hidden = names.length > 0;
  $("cn-units").hidden = names.length === 0;
  $("cn-units").innerHTML = Array.from({ length: UNITS }, (_, i) => unitHtml(i)).join("");
  for (let i = 0; i < UNITS; i++) {
    const field = (name) => $(`cn${i}-${name}`);
    const unit = { root: $(`cn${i}`), field, canvas: field("canvas"), hasImage: false, painting: false, undo: [] };
    units.push(unit);
    field("model").replaceChildren(...names.map((n) => new Option(n, n)));
    field("preprocessor").replaceChildren(...preprocessors.map((p) => new Option(p.name, p.name)));
    field("control_mode").replaceChildren(...MODES.map(option));
    field("resize_mode").replaceChildren(...RESIZES.map(option));
    wireUnit(unit);
    syncThresholds(unit);
  }
  restore();
  $("controlnet").addEventListener("input", changed);
  $("controlnet").addEventListener("change", changed);
  updateCount();
}

function changed() {
  updateCount();
  save();
  onChange();
}

function updateCount() {
  let on = 0;
  for (const [i, u] of units.entries()) {
    const enabled = u.field("enabled").checked;
    on += enabled;
    $(`cn${i}-state`).textContent = enabled ? `(${u.field("model").value || "no model"})` : "";
  }
  $("cn-count").textContent = on ? `${on} enabled` : "";
}

// Threshold inputs show the preprocessor's defaults and are off where it takes none.
function syncThresholds(unit) {
  const pre = preprocessors.find((p) => p.name === unit.field("preprocessor").value) || {};
  for (const ab of ["a", "b"]) {
    const input = unit.field(`threshold_${ab}`);
    const def = pre[`threshold_${ab}`];
    input.disabled = def == null;
    input.placeholder = def == null ? "not used" : String(def);
    if (def == null) input.value = "";
  }
}

function wireUnit(unit) {
  const { field, canvas } = unit;
  field("file").addEventListener("change", (e) => {
    if (e.target.files[0]) loadImage(unit, e.target.files[0]).catch((err) => hintText(unit, err.message));
    e.target.value = "";  // the same file again is a change too
  });
  field("upload").addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); field("file").click(); }
  });
  field("draw").addEventListener("click", () => { blank(unit); changed(); });
  field("clear").addEventListener("click", () => { clearImage(unit); changed(); });
  field("undo").addEventListener("click", () => {
    const snapshot = unit.undo.pop();
    if (snapshot) { canvas.getContext("2d").putImageData(snapshot, 0, 0); changed(); }
  });
  field("preprocessor").addEventListener("change", () => syncThresholds(unit));
  field("preview").addEventListener("click", () => preview(unit));
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    const ctx = canvas.getContext("2d");
    unit.undo.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
    if (unit.undo.length > 20) unit.undo.shift();
    unit.painting = true;
    unit.last = point(canvas, e);
    stroke(unit, unit.last, unit.last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!unit.painting) return;
    const p = point(canvas, e);
    stroke(unit, unit.last, p);
    unit.last = p;
  });
  const end = () => { if (unit.painting) { unit.painting = false; changed(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

function point(canvas, e) {
  const rect = canvas.getBoundingClientRect();
  return { x: (e.clientX - rect.left) * (canvas.width / rect.width),
           y: (e.clientY - rect.top) * (canvas.height / rect.height) };
}

function stroke(unit, from, to) {
  const canvas = unit.canvas, ctx = canvas.getContext("2d");
  ctx.strokeStyle = "#fff";  // white on black: what scribble ControlNets (and the built-in layout one) take
  ctx.lineWidth = Number(unit.field("brush").value) * (canvas.width / canvas.getBoundingClientRect().width);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + 0.01, to.y);  // a zero-length line draws nothing: nudge it so a click paints a dot
  ctx.stroke();
}

function showCanvas(unit, on) {
  unit.hasImage = on;
  unit.canvas.hidden = !on;
  unit.field("empty").hidden = on;
  unit.field("undo").disabled = unit.field("clear").disabled = !on;
  if (!on) { unit.field("hint").hidden = true; hintText(unit, ""); }
}

// A black canvas of the image's size (what the ControlNet sees, and within the server's input limit), to draw on;
// shown enlarged, so strokes are as easy to place on a 64 px canvas as on a 512 px one.
function blank(unit) {
  const w = Number($("width").value) || DRAW_SIZE, h = Number($("height").value) || w;
  const canvas = unit.canvas;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  unit.undo = [];
  showCanvas(unit, true);
}

// An uploaded file (or a stored data URL) becomes the canvas: strokes drawn later go over it.
async function loadImage(unit, fileOrUrl) {
  const url = typeof fileOrUrl === "string" ? fileOrUrl : URL.createObjectURL(fileOrUrl);
  const img = new Image();
  img.src = url;
  try { await img.decode(); } catch (e) { throw new Error("this file is not an image the browser can read"); }
  const canvas = unit.canvas;
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.getContext("2d").drawImage(img, 0, 0);
  unit.undo = [];
  showCanvas(unit, true);
  if (typeof fileOrUrl !== "string") { URL.revokeObjectURL(url); changed(); }
}

function clearImage(unit) {
  unit.undo = [];
  showCanvas(unit, false);
}

function hintText(unit, text) { unit.field("hint-text").textContent = text; }

function numberOf(input) { return input.value.trim() === "" ? undefined : Number(input.value); }

// POST /api/v1/preprocess: the hint this unit's preprocessor makes of its image, shown beside it.
async function preview(unit) {
  if (!unit.hasImage) { hintText(unit, "Upload or draw a control image first."); return; }
  const body = { image: unit.canvas.toDataURL("image/png"), preprocessor: unit.field("preprocessor").value };
  for (const ab of ["a", "b"]) {
    const v = numberOf(unit.field(`threshold_${ab}`));
    if (v !== undefined) body[`threshold_${ab}`] = v;
  }
  hintText(unit, "Preprocessing\u2026");
  try {
    const out = await api("/api/v1/preprocess", { method: "POST", json: body });
    const img = unit.field("hint");
    img.src = `data:image/png;base64,${out.image}`;
    img.hidden = false;
    hintText(unit, `${out.preprocessor}, ${out.width}\u00d7${out.height}`);
    unit.root.dataset.previewed = out.preprocessor;
  } catch (e) {
    unit.field("hint").hidden = true;
    hintText(unit, e.message);
  }
}

// The enabled units as the request's `controlnets` (empty: none); errors name the unit and what to do.
export function controlUnits(mode, hasInitImage) {
  if (!inControlMode(mode)) return [];
  const out = [];
  for (const [i, u] of units.entries()) {
    if (!u.field("enabled").checked) continue;
    const model = u.field("model").value;
    if (!model) throw new Error(`ControlNet unit ${i} has no model: put ControlNet files in the server's folders`);
    if (!u.hasImage && !hasInitImage) {
      throw new Error(`ControlNet unit ${i} needs a control image: upload one or draw one (or disable the unit)`);
    }
    const unit = { model, preprocessor: u.field("preprocessor").value, control_mode: u.field("control_mode").value,
                   resize_mode: u.field("resize_mode").value };
    if (u.hasImage) unit.image = u.canvas.toDataURL("image/png");  // else: the init image, as A1111
    for (const name of ["weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b"]) {
      const v = numberOf(u.field(name));
      if (v !== undefined && !u.field(name).disabled) unit[name] = v;
    }
    out.push(unit);
  }
  return out;
}

function inControlMode(mode) { return $("controlnet").dataset.modes.split(" ").includes(mode); }

// -- kept across reloads: every unit's settings, and its image when small enough -----------------------------
const FIELDS = ["enabled", "model", "preprocessor", "threshold_a", "threshold_b", "weight", "guidance_start",
                "guidance_end", "control_mode", "resize_mode", "brush"];

function save() {
  const state = units.map((u) => {
    const s = { open: u.root.open };
    for (const f of FIELDS) s[f] = f === "enabled" ? u.field(f).checked : u.field(f).value;
    const image = u.hasImage ? u.canvas.toDataURL("image/png") : null;
    s.image = image && image.length <= MAX_STORED_IMAGE ? image : null;
    return s;
  });
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify({ open: $("controlnet").open, units: state }));
  } catch (e) { /* storage full or disabled: the panel just starts fresh after a reload */ }
}

function restore() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { return; }
  if (!saved || !Array.isArray(saved.units)) return;
  $("controlnet").open = Boolean(saved.open);
  for (const [i, s] of saved.units.slice(0, UNITS).entries()) {
    if (!s || typeof s !== "object") continue;
    const u = units[i];
    u.root.open = Boolean(s.open);
    for (const f of FIELDS) {
      if (!(f in s)) continue;
      const input = u.field(f);
      if (f === "enabled") input.checked = Boolean(s[f]);
      else if (input.tagName !== "SELECT" || [...input.options].some((o) => o.value === s[f])) input.value = s[f];
    }
    syncThresholds(u);
    for (const ab of ["a", "b"]) if (!u.field(`threshold_${ab}`).disabled) u.field(`threshold_${ab}`).value = s[`threshold_${ab}`] ?? "";
    if (typeof s.image === "string" && s.image.startsWith("data:image/")) loadImage(u, s.image).catch(() => {});
  }
}
