// The API client and the form: every [data-field] element is one GenerationRequest field of the same name.

export const $ = (id) => document.getElementById(id);

// A server started with --token: the page is opened once as /?token=...; the server answers with the token in an
// HttpOnly cookie that the browser sends with every request (fetch, EventSource, <img>), so no URL carries it
// (URLs end up in access logs and the history). Here the page drops it from its own address too.
const address = new URL(location.href);
if (address.searchParams.has("token")) {
  address.searchParams.delete("token");
  history.replaceState(history.state, "", address);
}

// fetch() that returns parsed JSON and throws an Error carrying the server's own message.
export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new Error("cannot reach the easel server (is `easel serve` still running?)");
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!response.ok) {
    const message = (data && (data.error || data.detail)) || text || response.statusText;
    const error = new Error(typeof message === "string" ? message : JSON.stringify(message));
    error.status = response.status;
    throw error;
  }
  return data;
}

function setOptions(select, items, selected) {
  select.replaceChildren(...items.map(({ value, label }) => new Option(label, value, false, value === selected)));
}

// The styles multi-select (GET /api/v1/styles), hidden when the server has none.
export function initStyles(styles) {
  const select = $("styles");
  select.replaceChildren(...styles.map((st) => {
    const option = new Option(st.name, st.name);
    option.title = [st.prompt && `prompt: ${st.prompt}`, st.negative_prompt && `negative: ${st.negative_prompt}`]
      .filter(Boolean).join("\n");
    return option;
  }));
  select.size = Math.min(6, Math.max(2, styles.length));
  $("styles-box").hidden = !styles.length;
}

// Fill the choice lists (samplers, schedulers, ... from the server) and the schema's defaults.
export function initForm(config, samplers, schedulers) {
  const d = config.defaults;
  setOptions($("sampler"), samplers.map((s) => ({ value: s.name, label: s.label })), d.sampler);
  const schedules = schedulers.map((s) => ({ value: s.name, label: s.label }));
  // No default scheduler: each sampler's own (A1111's "Automatic"), sent as no scheduler at all.
  if (d.scheduler == null) schedules.unshift({ value: "", label: "Sampler's default" });
  setOptions($("scheduler"), schedules, d.scheduler ?? "");
  const plain = (names) => names.map((n) => ({ value: n, label: n.replaceAll("_", " ") }));
  setOptions($("hr_upscaler"), plain(config.choices.hr_upscaler), d.hr_upscaler);
  setOptions($("inpainting_fill"), plain(config.choices.inpainting_fill), d.inpainting_fill);
  setOptions($("preview_mode"), plain(config.choices.preview_mode), d.preview_mode);
  const resize = $("resize_mode");
  resize.append(...plain(config.choices.resize_mode).map(({ value, label }) => new Option(label, value)));
  resize.value = "";
  const model = config.model || {};
  const defaults = { ...d, width: model.default_size, height: model.default_size,
                     batch_size: model.default_batch, preview_every: 1 };
  delete defaults.resize_mode;  // the edit tabs start with "keep the image's size"
  writeForm(defaults);
  $("steps").max = config.limits.max_steps;
  $("hr_second_pass_steps").max = config.limits.max_steps;
  for (const id of ["batch_size", "n_iter"]) $(id).max = config.limits.max_batch;
  const strength = $("denoising_strength");
  strength.addEventListener("input", () => { strength.nextElementSibling.value = strength.value; });
  strength.dispatchEvent(new Event("input"));
}

// Is an element shown in this mode? (inside no [data-modes] section, or in one that lists the mode)
export function inMode(element, mode) {
  for (let e = element; e; e = e.parentElement) {
    const modes = e.dataset && e.dataset.modes;
    if (modes && !modes.split(" ").includes(mode)) return false;
  }
  return true;
}

const selectedValues = (select) => [...select.selectedOptions].map((o) => o.value);

function fieldValue(element) {
  if (element.type === "checkbox") return element.checked;
  if (element.multiple) {  // a list field (styles): nothing chosen is left to the server
    const values = selectedValues(element);
    return values.length ? values : undefined;
  }
  if (element.type === "number" || element.type === "range") {
    return element.value.trim() === "" ? undefined : Number(element.value);
  }
  if (element.tagName === "SELECT" && element.value === "") return undefined;  // "" options: left to the server
  return element.value;
}

// The request fields of the form as the given mode uses them (blank numbers: left to the server).
export function readForm(mode) {
  const body = {};
  for (const element of document.querySelectorAll("[data-field]")) {
    if (!inMode(element, mode)) continue;
    const value = fieldValue(element);
    if (value !== undefined) body[element.dataset.field] = value;
  }
  if (!["txt2img", "xyz"].includes(mode) && !body.resize_mode) {
    // "keep the image's size": no resize, so width and height come from the image itself.
    delete body.resize_mode; delete body.width; delete body.height;
  }
  if (!body.enable_hr) {
    for (const key of Object.keys(body)) if (key.startsWith("hr_")) delete body[key];
  }
  return body;
}

// Put request fields (defaults, or an image's parameters) into the form; unknown keys are ignored.
export function writeForm(fields) {
  for (const element of document.querySelectorAll("[data-field]")) {
    const name = element.dataset.field;
    if (!(name in fields)) continue;
    const value = fields[name];
    if (element.type === "checkbox") element.checked = Boolean(value);
    else if (element.multiple) {
      const chosen = Array.isArray(value) ? value.map(String) : [];
      for (const option of element.options) option.selected = chosen.includes(option.value);
    } else if (element.tagName === "SELECT" && value != null &&
             ![...element.options].some((o) => o.value === String(value))) continue;
    else element.value = value == null ? "" : value;
    element.dispatchEvent(new Event("input"));
  }
  if (Array.isArray(fields.loras)) setLoras(fields.loras);
}

// -- LoRA picker: writes <lora:name:weight> into the prompt, as A1111 does, so that the PNG's parameters text
// carries it and A1111/civitai re-apply it. The chips below the picker show the prompt's tags, editable.
const LORA_TAG = /<(lora|lyco):([^:>]+)(?::([^>]*))?>/gi;

export function initLoras(entries) {
  const pick = $("lora-pick");
  $("prompt").addEventListener("input", renderLoraChips);
  $("lora-add").addEventListener("click", () => {
    if (pick.value) addLora(pick.value, Number($("lora-weight").value || 1));
  });
  fillLoras(entries);
}

function fillLoras(entries) {
  const pick = $("lora-pick");
  const keep = pick.value;
  const none = !entries.length;
  pick.disabled = $("lora-add").disabled = $("lora-weight").disabled = none;
  if (none) {
    setOptions(pick, [{ value: "", label: "(no LoRA files in the LoRA folders)" }], "");
    return;
  }
  const names = entries.map((e) => e.name);
  setOptions(pick, names.map((n) => ({ value: n, label: n })), names.includes(keep) ? keep : names[0]);
}

// List the server's LoRAs again (a training job just wrote one).
export async function refreshLoras() {
  try { fillLoras(await api("/api/v1/loras")); } catch (e) { /* the picker keeps its list */ }
}

// The prompt's LoRA tags: [{name, weight (text as written), index, length}].
export function loraTags(prompt) {
  return [...prompt.matchAll(LORA_TAG)].map((m) => ({ name: m[2], weight: m[3] ?? "1", index: m.index,
                                                      length: m[0].length }));
}

function setPrompt(text) {
  const prompt = $("prompt");
  prompt.value = text;
  prompt.dispatchEvent(new Event("input"));
}

// Put <lora:name:weight> into the prompt (or change the weight of the tag already there).
export function addLora(name, weight) {
  if (!name) return;
  const text = $("prompt").value;
  const tag = `<lora:${name}:${weight}>`;
  const existing = loraTags(text).find((t) => t.name === name);
  if (existing) setPrompt(text.slice(0, existing.index) + tag + text.slice(existing.index + existing.length));
  else setPrompt(text + (text && !/\s$/.test(text) ? " " : "") + tag);
}

function removeLora(name) {
  const t = loraTags($("prompt").value).find((x) => x.name === name);
  if (!t) return;
  const text = $("prompt").value;
  setPrompt((text.slice(0, t.index).replace(/[ ,]*$/, "") + " " + text.slice(t.index + t.length).replace(/^[ ,]*/, "")).trim());
}

function renderLoraChips() {
  const chips = loraTags($("prompt").value).map(({ name, weight }) => {
    const li = document.createElement("li");
    li.dataset.name = name;
    const w = Object.assign(document.createElement("input"), { type: "number", step: "0.05", value: weight });
    w.setAttribute("aria-label", `weight of ${name}`);
    w.addEventListener("change", () => addLora(name, w.value || 1));
    const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "\u00d7",
                                                                      title: "Remove from the prompt" });
    remove.setAttribute("aria-label", `remove ${name}`);
    remove.addEventListener("click", () => { $("lora-pick").focus(); removeLora(name); });  // focus: not lost
    li.append(name + " ", w, remove);
    return li;
  });
  const list = $("lora-list");
  if (list.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;  // typing
  list.replaceChildren(...chips);
}

// LoRAs given as a list (an easel PNG made through the API's `loras` field) become prompt tags.
function setLoras(specs) {
  for (const spec of specs) {
    const at = spec.lastIndexOf(":");
    const weight = at > 0 ? Number(spec.slice(at + 1)) : NaN;
    if (Number.isNaN(weight)) addLora(spec, 1); else addLora(spec.slice(0, at), weight);
  }
}

// -- the form survives a reload: every field, the tab and the model, in localStorage ---------------------------
const STORE_KEY = "easel.form";

// Save what the user set; called on every change (a few hundred bytes: cheap enough to write each time).
export function saveForm(mode) {
  const fields = {};
  for (const element of document.querySelectorAll("[data-field]")) {
    // As typed (a blank number stays blank: "left to the server" survives the reload too).
    fields[element.dataset.field] = element.type === "checkbox" ? element.checked
      : element.multiple ? selectedValues(element) : element.value;
  }
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify({ mode, model: $("model").value, fields }));
  } catch (e) { /* storage full or disabled (private mode): the form just will not survive a reload */ }
}

// The saved {mode, model, fields} (null when nothing was saved or it cannot be read).
export function restoreForm() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (e) { return null; }
  if (!saved || typeof saved !== "object" || typeof saved.fields !== "object") return null;
  writeForm(saved.fields);
  const model = $("model");
  if ([...model.options].some((o) => o.value === saved.model)) model.value = saved.model;
  return saved;
}

/** Files (or gallery images) dropped on `zone` go to `onFile` as a File or Blob. */
export function fileDrop(zone, onFile) {
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
