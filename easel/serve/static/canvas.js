// The image to edit (img2img / inpaint / outpaint) and the inpaint mask painted over it with a brush.
import { $ } from "./form.js";

const DISPLAY = 512;  // small images are drawn enlarged (whole pixels) so that a brush can be precise
const state = { image: null, dataUrl: null, k: 1, painting: false, last: null, undo: [], mode: "txt2img" };

export function hasSource() { return state.image !== null; }
export function sourceDataUrl() { return state.dataUrl; }

// Load an image (a File/Blob or a URL) as the picture to edit; resolves with the <img>.
export async function setSource(blobOrUrl) {
  const url = typeof blobOrUrl === "string" ? blobOrUrl : await readAsDataUrl(blobOrUrl);
  const img = new Image();
  img.src = url;
  try { await img.decode(); } catch (e) { throw new Error("this file is not an image the browser can read"); }
  state.image = img;
  state.dataUrl = url.startsWith("data:") ? url : await toDataUrl(img);
  state.k = Math.max(1, Math.floor(DISPLAY / Math.max(img.naturalWidth, img.naturalHeight)));
  state.undo = [];
  const mask = $("mask-canvas");
  mask.width = img.naturalWidth * state.k;
  mask.height = img.naturalHeight * state.k;  // resizing a canvas also clears it: a new picture, a new mask
  render(state.mode);
  return img;
}

export function clearSource() {
  state.image = state.dataUrl = null;
  state.undo = [];
  render(state.mode);
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read the file"));
    reader.readAsDataURL(blob);
  });
}

function toDataUrl(img) {
  const c = Object.assign(document.createElement("canvas"), { width: img.naturalWidth, height: img.naturalHeight });
  c.getContext("2d").drawImage(img, 0, 0);
  return c.toDataURL("image/png");
}

function borders() {
  const px = (id) => Math.max(0, Number($(id).value) || 0);
  return { left: px("outpaint_left"), right: px("outpaint_right"), up: px("outpaint_up"), down: px("outpaint_down") };
}

// Draw the picture for a mode: inpaint shows the mask on top; outpaint shows the new borders checkered.
export function render(mode) {
  state.mode = mode;
  const has = state.image !== null;
  $("canvas-wrap").hidden = !has;
  $("dropzone").hidden = has;
  $("source-clear").disabled = !has;
  if (!has) { $("source-size").textContent = ""; return; }
  const { naturalWidth: w, naturalHeight: h } = state.image;
  const b = mode === "outpaint" ? borders() : { left: 0, right: 0, up: 0, down: 0 };
  const k = state.k, canvas = $("source-canvas");
  canvas.width = (w + b.left + b.right) * k;
  canvas.height = (h + b.up + b.down) * k;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  if (mode === "outpaint") drawChecker(ctx, canvas.width, canvas.height, 8 * k);
  ctx.drawImage(state.image, b.left * k, b.up * k, w * k, h * k);
  $("mask-canvas").hidden = mode !== "inpaint";
  const out = mode === "outpaint" ? ` \u2192 ${w + b.left + b.right}\u00d7${h + b.up + b.down}` : "";
  $("source-size").textContent = `${w}\u00d7${h} px${out}`;
}

function drawChecker(ctx, width, height, cell) {
  for (let y = 0; y < height; y += cell) {
    for (let x = 0; x < width; x += cell) {
      ctx.fillStyle = ((x + y) / cell) % 2 ? "#5a5a66" : "#474752";
      ctx.fillRect(x, y, cell, cell);
    }
  }
}

// -- the mask brush -------------------------------------------------------------------------------------------
export function initMaskBrush() {
  const mask = $("mask-canvas");
  mask.addEventListener("contextmenu", (e) => e.preventDefault());  // the right button erases
  mask.addEventListener("pointerdown", (e) => {
    mask.setPointerCapture(e.pointerId);
    state.undo.push(mask.getContext("2d").getImageData(0, 0, mask.width, mask.height));
    if (state.undo.length > 30) state.undo.shift();
    state.painting = true;
    state.erasing = e.button === 2 || $("brush-erase").getAttribute("aria-pressed") === "true";
    state.last = point(e);
    stroke(state.last, state.last);
  });
  mask.addEventListener("pointermove", (e) => {
    if (!state.painting) return;
    const p = point(e);
    stroke(state.last, p);
    state.last = p;
  });
  const end = () => { state.painting = false; };
  mask.addEventListener("pointerup", end);
  mask.addEventListener("pointercancel", end);
  $("brush-erase").addEventListener("click", (e) => {
    const on = e.currentTarget.getAttribute("aria-pressed") !== "true";
    e.currentTarget.setAttribute("aria-pressed", String(on));
  });
  $("mask-undo").addEventListener("click", () => {
    const snapshot = state.undo.pop();
    if (snapshot) mask.getContext("2d").putImageData(snapshot, 0, 0);
  });
  $("mask-clear").addEventListener("click", () => {
    state.undo.push(mask.getContext("2d").getImageData(0, 0, mask.width, mask.height));
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  });
}

// Pointer position in canvas pixels (the canvas is drawn scaled to fit its column).
function point(e) {
  const mask = $("mask-canvas"), rect = mask.getBoundingClientRect();
  return { x: (e.clientX - rect.left) * (mask.width / rect.width),
           y: (e.clientY - rect.top) * (mask.height / rect.height) };
}

function stroke(from, to) {
  const mask = $("mask-canvas"), ctx = mask.getContext("2d");
  const screenToCanvas = mask.width / mask.getBoundingClientRect().width;
  ctx.globalCompositeOperation = state.erasing ? "destination-out" : "source-over";
  ctx.strokeStyle = "rgb(255, 72, 160)";  // any opaque colour: only the alpha becomes the mask
  ctx.lineWidth = Number($("brush-size").value) * screenToCanvas;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + 0.01, to.y);  // a zero-length line draws nothing: nudge it so a click paints a dot
  ctx.stroke();
}

// The mask at the image's own size: white where painted (repaint), black elsewhere, as a PNG data URL.
export function maskDataUrl() {
  const { naturalWidth: w, naturalHeight: h } = state.image;
  const c = Object.assign(document.createElement("canvas"), { width: w, height: h });
  const ctx = c.getContext("2d");
  ctx.drawImage($("mask-canvas"), 0, 0, w, h);
  const data = ctx.getImageData(0, 0, w, h);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    const v = px[i + 3] >= 128 ? 255 : 0;  // half-covered pixels count as painted at the stroke's middle
    px[i] = px[i + 1] = px[i + 2] = v;
    px[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  return c.toDataURL("image/png");
}

export function maskEmpty() {
  const mask = $("mask-canvas");
  const px = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
  for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) return false;
  return true;
}
