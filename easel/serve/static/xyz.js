// The X/Y/Z tab: the generate form plus up to three axes (a request field and its values), queued as one job
// (POST /api/v1/xyz). The plot's grid when it is done, and its cells laid out as the grid is (columns: X, rows: Y,
// one block per Z), each a button that shows that cell with its parameters.
import { $, api } from "./form.js";

const AXES = ["x", "y", "z"];
// The fields an axis offers, with a placeholder showing what its values look like.
const FIELDS = [
  ["steps", "Steps", "4-20 (+4)"], ["cfg_scale", "CFG scale", "3,7,11"], ["sampler", "Sampler", "euler, dpmpp_2m"],
  ["scheduler", "Scheduler", "karras, normal"], ["seed", "Seed", "1,2,3"], ["size", "Size", "64x64, 96x96"],
  ["width", "Width", "64,96"], ["height", "Height", "64,96"], ["prompt_sr", "Prompt S/R", "red, blue, green"],
  ["negative_prompt", "Negative prompt", "blurry, dark"], ["clip_skip", "Clip skip", "1,2"], ["eta", "Eta", "0,1"],
  ["subseed", "Variation seed", "1,2,3"], ["subseed_strength", "Variation strength", "0-1 [3]"],
  ["hr_scale", "Hires upscale", "1.5,2"], ["hr_denoising_strength", "Hires denoising", "0.3,0.5,0.7"],
  ["hr_second_pass_steps", "Hires steps", "5,10"], ["hr_upscaler", "Hires upscaler", "latent, lanczos"],
  ["styles", "Styles", "a style, another"],
];
const RANGE = /^\s*([+-]?\d*\.?\d+)\s*-\s*([+-]?\d*\.?\d+)\s*(?:\(\s*([+-]?\d*\.?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$/;
let shown = null;  // the plot shown: {id, task, cell}

// How many values an axis's text gives (ranges counted as the server expands them; NaN when unreadable).
export function countValues(text) {
  const items = text.split(",").map((v) => v.trim()).filter(Boolean);
  let n = 0;
  for (const item of items) {
    const m = item.match(RANGE);
    if (!m) { n += 1; continue; }
    const [lo, hi] = [Number(m[1]), Number(m[2])];
    if (m[4] !== undefined) { n += Number(m[4]); continue; }
    const step = m[3] !== undefined ? Number(m[3]) : (hi >= lo ? 1 : -1);
    if (!step || (hi - lo) * step < 0) return NaN;
    n += Math.floor((hi - lo) / step + 1e-9) + 1;
  }
  return n;
}

// The axes of the form: [{axis, field, values}] (a field without values is an error, naming the axis).
export function readAxes() {
  const axes = [];
  for (const a of AXES) {
    const field = $(`xyz-${a}-field`).value;
    const values = $(`xyz-${a}-values`).value.trim();
    if (!field) continue;
    if (!values) throw new Error(`${a.toUpperCase()} axis: write the values of ${field}, separated by commas`);
    axes.push({ axis: a, field, values });
  }
  if (!axes.length) throw new Error("choose a field and its values for at least one axis (X, Y or Z) above the form");
  return axes;
}

function updateCount() {
  const counts = AXES.filter((a) => $(`xyz-${a}-field`).value && $(`xyz-${a}-values`).value.trim())
    .map((a) => countValues($(`xyz-${a}-values`).value));
  const total = counts.reduce((p, n) => p * n, 1);
  $("xyz-count").textContent = !counts.length ? "No axis yet."
    : Number.isNaN(total) ? "A range gives no values: check the step's sign."
    : `${total} cell${total === 1 ? "" : "s"} (${counts.join(" \u00d7 ")}): one image each, then the grid`;
  for (const a of AXES) {
    const f = FIELDS.find(([name]) => name === $(`xyz-${a}-field`).value);
    $(`xyz-${a}-values`).placeholder = f ? `e.g. ${f[2]}` : "choose a field first";
    $(`xyz-${a}-values`).disabled = !f;
  }
}

// -- the plot ------------------------------------------------------------------------------------------------
export function showXYZPreview(id, png) {
  if (shown && shown.id === id) return;  // the finished plot stays
  const img = $("xyz-preview");
  img.src = `data:image/png;base64,${png}`;
  img.hidden = false;
  $("xyz-grid-open").hidden = true;
  $("xyz-empty").hidden = true;
}

// A finished (or stopped) X/Y/Z job: its grid and cells.
export async function showPlot(id) {
  let job;
  try { job = await api(`/api/v1/jobs/${id}`); } catch (e) { return; }
  const task = job.task;
  if (!task || task.kind !== "xyz") return;
  shown = { id, task, cell: null };
  $("xyz-preview").hidden = true;
  if (task.grid) {
    $("xyz-grid").src = task.grid;
    $("xyz-grid-open").href = task.grid;
    $("xyz-grid-open").hidden = false;
    $("xyz-empty").hidden = true;
    $("xyz-download-grid").href = task.grid;
    $("xyz-download-grid").download = `easel-xyz-${id}.png`;
  } else {
    $("xyz-grid-open").hidden = true;
    $("xyz-empty").hidden = false;
    $("xyz-empty").textContent = `The plot was ${job.state} after ${task.cells_done} of ${task.cells} cells: no grid; ` +
      "the cells made are below.";
  }
  $("xyz-download-grid").hidden = !task.grid;
  renderCells(task);
  $("xyz-info").hidden = true;
  document.body.dataset.plotted = id;  // tests (and scripts) wait on this
}

// The cells as the grid lays them out: a table per Z value, X labels over the columns, Y labels beside the rows.
function renderCells(task) {
  const [nx, ny, nz] = task.shape;
  const label = (axis, i) => {
    const a = task.axes.find((x) => x.axis === axis);
    return a ? a.labels[i] : "";
  };
  const blocks = [];
  for (let z = 0; z < nz; z++) {
    const table = document.createElement("table");
    table.className = "xyz-table";
    if (label("z", z)) table.createCaption().textContent = label("z", z);
    const head = table.createTHead().insertRow();
    head.append(document.createElement("td"));
    for (let x = 0; x < nx; x++) {
      const th = Object.assign(document.createElement("th"), { scope: "col", textContent: label("x", x) });
      head.append(th);
    }
    const body = table.createTBody();
    for (let y = 0; y < ny; y++) {
      const row = body.insertRow();
      row.append(Object.assign(document.createElement("th"), { scope: "row", textContent: label("y", y) }));
      for (let x = 0; x < nx; x++) {
        const n = (z * ny + y) * nx + x;  // X fastest, then Y, then Z: the server's cell order
        const td = row.insertCell();
        if (n >= task.cell_urls.length) { td.className = "muted"; td.textContent = "\u2013"; continue; }
        const b = Object.assign(document.createElement("button"), { type: "button", className: "frame" });
        const name = [label("x", x), label("y", y), label("z", z)].filter(Boolean).join(", ");
        b.setAttribute("aria-label", `cell ${name || n}`);
        b.setAttribute("aria-pressed", "false");
        b.dataset.cell = String(n);
        b.append(Object.assign(document.createElement("img"), { src: task.cell_urls[n], alt: "" }));
        b.addEventListener("click", () => selectCell(n));
        td.append(b);
      }
    }
    blocks.push(table);
  }
  $("xyz-cells").replaceChildren(...blocks);
  $("xyz-cells").hidden = !task.cell_urls.length;
}

// Show one cell large, with its parameters; pressing it again goes back to the grid.
function selectCell(n) {
  if (!shown) return;
  const task = shown.task;
  const again = shown.cell === n;
  shown.cell = again ? null : n;
  for (const b of $("xyz-cells").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(!again && b.dataset.cell === String(n)));
  }
  if (again) {
    if (task.grid) { $("xyz-grid").src = task.grid; $("xyz-grid-open").href = task.grid; }
    $("xyz-info").hidden = true;
    return;
  }
  $("xyz-grid").src = task.cell_urls[n];
  $("xyz-grid-open").href = task.cell_urls[n];
  $("xyz-grid-open").hidden = false;
  $("xyz-empty").hidden = true;
  $("xyz-infotext").textContent = (task.cell_infotexts || [])[n] || "";
  $("xyz-download-cell").href = task.cell_urls[n];
  $("xyz-download-cell").download = `easel-xyz-${shown.id}-cell${n}.png`;
  $("xyz-info").hidden = false;
}

// The picture in the view at the largest whole multiple of its size that fits (at most 3x the grid, a cell 6x:
// a 64 px cell as large as a result); whole multiples keep the labels' pixels crisp.
function fitView() {
  const img = $("xyz-grid");
  if (!img.naturalWidth) return;
  const room = $("xyz-view").clientWidth - 16;
  const most = img.src.includes("/cells/") ? 6 : 3;
  const k = Math.max(1, Math.min(most, Math.floor(room / img.naturalWidth)));
  img.style.width = `${Math.min(room, img.naturalWidth * k)}px`;
}

// -- start-up ----------------------------------------------------------------------------------------------------
const STORE_KEY = "easel.xyz";

function save() {
  const values = {};
  for (const a of AXES) values[a] = [$(`xyz-${a}-field`).value, $(`xyz-${a}-values`).value];
  try { localStorage.setItem(STORE_KEY, JSON.stringify(values)); } catch (e) { /* not kept */ }
}

export async function initXYZ() {
  $("xyz-grid").addEventListener("load", fitView);
  window.addEventListener("resize", fitView);
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { saved = null; }
  for (const a of AXES) {
    const select = $(`xyz-${a}-field`);
    select.replaceChildren(new Option("(none)", ""), ...FIELDS.map(([name, text]) => new Option(text, name)));
    const [field, values] = (saved && saved[a]) || (a === "x" ? ["cfg_scale", "3,7,11"] : ["", ""]);
    if (FIELDS.some(([name]) => name === field)) select.value = field;
    $(`xyz-${a}-values`).value = values || "";
    select.addEventListener("change", () => { updateCount(); save(); });
    $(`xyz-${a}-values`).addEventListener("input", () => { updateCount(); save(); });
  }
  updateCount();
  try {  // after a reload: the newest plot again
    const [latest] = await api("/api/v1/jobs?kind=xyz&limit=1");
    if (latest && ["done", "cancelled", "interrupted"].includes(latest.state)) await showPlot(latest.id);
  } catch (e) { /* no plot shown: nothing lost */ }
}
