// The queue: every job the server remembers (so a reload loses nothing), shown as a list with a cancel button
// each. One job at a time is followed over server-sent events (progress bar, live previews); the rest are
// polled, so that a queue of many jobs holds one connection, not one each.
import { $, api } from "./form.js";
import { addJobResults, clearPreview, setProgressText, showJob, showPreview, showProgress } from "./gallery.js";
import { addInsideJobs } from "./inside.js";
import { showPlot, showXYZPreview } from "./xyz.js";

let FINISHED = ["done", "failed", "cancelled", "interrupted"];  // the server's list replaces it (config)
const POLL_MS = 1000;
const FINISHED_SHOWN = 10;  // finished jobs listed under the running and queued ones
const jobs = new Map();     // id -> the job as /ui/jobs gives it, in the server's order (oldest first)
const shown = new Set();    // finished jobs whose images are in the gallery
let followed = null;        // {id, events}: the job in the progress bar
let pollTimer = null;
let streamRetryAt = 0;      // after a broken event stream, the poll alone reports for a while
let onError = () => {};

const isFinished = (job) => FINISHED.includes(job.state);

// Load every job the server remembers: finished images into the gallery, running/queued ones followed again.
export async function loadJobs(showError, finishedStates) {
  onError = showError;
  if (finishedStates) FINISHED = finishedStates;
  const list = await api("/ui/jobs?full=true");
  for (const job of list) {
    jobs.set(job.id, job);
    if (isFinished(job)) shown.add(job.id);
  }
  addJobResults(list.filter(isFinished));
  addInsideJobs(list.filter(isFinished));
  render();
  track();
}

// A job the page just submitted.
export function submitted(job, prompt) {
  jobs.set(job.id, { ...job, prompt: prompt ?? (job.request ? job.request.prompt : "") });
  render();
  track();
}

// The job in the progress bar (the one the Cancel button stops): the followed one, else the first unfinished.
export function currentJob() {
  if (followed) return followed.id;
  const open = openJobs().filter(isGeneration);
  return open.length ? open[0].id : null;
}

// Training, animation and upscale jobs wait in the same queue (listed, each with its cancel button); their own tabs
// show their progress. Generations and X/Y/Z plots are followed here.
const OWN_TAB = ["train", "animate", "extras"];
const isGeneration = (job) => !OWN_TAB.includes(job.mode) && !OWN_TAB.includes(job.kind);
const kindOf = (job) => job.kind || job.mode;
// A task job's own description (its task's label), else the prompt.
const taskOf = (job) => job.task || (kindOf(job) !== "train" ? job.train : null) || null;
const jobText = (job) => (taskOf(job) && taskOf(job).label) || job.prompt || "";

// Unfinished jobs, the running one(s) first, then the queue in its order.
function openJobs() {
  const all = [...jobs.values()];
  return all.filter((j) => j.state === "running").concat(all.filter((j) => j.state === "queued"));
}

export async function cancelJob(id) {
  try {
    await api(`/api/v1/jobs/${id}`, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 409) onError(e.message);  // 409: it finished meanwhile; its done event follows
  }
  poll();
}

// Follow the running job, else the oldest queued one; poll while anything is unfinished.
function track() {
  const open = openJobs();
  const generations = open.filter(isGeneration);
  if (!followed && generations.length && Date.now() >= streamRetryAt) follow(generations[0].id);
  document.body.dataset.busy = String(open.length > 0);
  $("cancel").disabled = !generations.length;
  if (open.length && !pollTimer) pollTimer = setTimeout(poll, POLL_MS);
}

function follow(id) {
  const events = new EventSource(`/api/v1/jobs/${id}/events`);
  followed = { id, events };
  document.body.dataset.job = id;
  events.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    update(p);
    showProgress(p);
  });
  events.addEventListener("preview", (e) => {
    const image = JSON.parse(e.data).image;
    if (kindOf(jobs.get(id) || {}) === "xyz") showXYZPreview(id, image);
    else showPreview(image);
  });
  events.addEventListener("done", (e) => { events.close(); finished(JSON.parse(e.data)); });
  events.onerror = () => {  // the stream broke (server restarted, network): the poll takes over, then a new one
    if (!followed || followed.id !== id) return;
    events.close();
    followed = null;
    streamRetryAt = Date.now() + 3 * POLL_MS;
    track();
  };
}

function update(fields) {
  const job = jobs.get(fields.id);
  if (job) Object.assign(job, fields);
  render();
}

async function poll() {
  clearTimeout(pollTimer);  // called early (after a cancel): one poll chain, not two
  pollTimer = null;
  let list;
  try {
    list = await api("/ui/jobs");
  } catch (e) {
    onError(e.message);
    pollTimer = setTimeout(poll, POLL_MS * 3);
    return;
  }
  const known = new Set(list.map((j) => j.id));
  for (const job of list) {
    const mine = jobs.get(job.id);
    jobs.set(job.id, mine ? Object.assign(mine, job) : job);
    if (isFinished(job) && !shown.has(job.id) && (!followed || followed.id !== job.id)) finished(job);
  }
  for (const id of [...jobs.keys()]) if (!known.has(id)) jobs.delete(id);  // forgotten by the server
  if (followed && !known.has(followed.id)) { followed.events.close(); followed = null; }
  render();
  track();
}

// A job finished (its done event, or the poll saw it): its images into the gallery, the next job followed.
async function finished(summary) {
  if (shown.has(summary.id)) return;
  shown.add(summary.id);
  const isFollowed = followed && followed.id === summary.id;
  let job = summary;
  try { job = await api(`/ui/jobs/${summary.id}`); } catch (e) { /* forgotten meanwhile: the summary will do */ }
  jobs.set(job.id, Object.assign(jobs.get(job.id) || {}, job));
  if (isFollowed) {
    followed = null;
    clearPreview();
    describeEnd(job);
  }
  addJobResults([job], isFollowed || !followed);
  addInsideJobs([job]);
  if (kindOf(job) === "xyz" && isFollowed) await showPlot(job.id);
  render();
  track();
  document.body.dataset.finished = job.id;  // tests (and scripts) wait on this
}

function describeEnd(job) {
  if (kindOf(job) === "xyz") { describePlotEnd(job); return; }
  const n = job.n_images ?? (job.images || []).length;
  if (job.state === "failed") {
    onError(job.error || "the job failed");
    setProgressText("Failed", "failed");
  } else if (job.state !== "done") {  // cancelled or interrupted: finished batches are kept
    const word = job.state[0].toUpperCase() + job.state.slice(1);
    setProgressText(n ? `${word} (kept ${images(n)} already finished)` : word, job.state);
  } else {
    const seconds = job.finished && job.started ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
    setProgressText(`Done: ${images(n)}${seconds}`, "done");
    $("progress-fill").style.width = "100%";
  }
}

function describePlotEnd(job) {
  const task = taskOf(job) || {};
  if (job.state === "failed") {
    onError(job.error || "the plot failed");
    setProgressText("Failed", "failed");
  } else if (job.state !== "done") {
    setProgressText(`${job.state[0].toUpperCase()}${job.state.slice(1)} after ${task.cells_done} of ${task.cells} cells`, job.state);
  } else {
    const seconds = job.finished && job.started ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
    setProgressText(`Done: ${task.cells} cells and the grid${seconds}`, "done");
    $("progress-fill").style.width = "100%";
  }
}

// -- the list -------------------------------------------------------------------------------------------------
const images = (n) => `${n} image${n === 1 ? "" : "s"}`;

// The row's detail: what the badge (the state) does not say already.
function describe(job) {
  const unit = kindOf(job) === "animate" ? "frame" : kindOf(job) === "extras" && job.total > 1 ? "tile" : "step";
  if (job.state === "running") return job.total ? `${unit} ${job.step}/${job.total}` : "starting";
  if (kindOf(job) === "train" && job.state !== "queued") return job.train && job.train.result ? job.train.file : "";
  if (!isGeneration(job) && job.state !== "queued") return job.state === "failed" ? job.error || "" : "";
  if (kindOf(job) === "xyz" && job.state !== "queued" && job.state !== "failed") {
    const task = taskOf(job) || {};
    return task.cells ? `${task.cells_done}/${task.cells} cells` : "";
  }
  if (job.state === "queued") return job.position ? `${job.position} ahead` : "next";
  if (job.state === "failed") return job.error || "";
  return job.n_images ? images(job.n_images) : "no images";
}

function row(job) {
  const li = document.createElement("li");
  li.dataset.id = job.id;
  const state = Object.assign(document.createElement("span"), { className: "badge" });
  const text = Object.assign(document.createElement("button"), { type: "button", className: "job-text" });
  const detail = Object.assign(document.createElement("span"), { className: "muted detail" });
  const cancel = Object.assign(document.createElement("button"), { type: "button", className: "icon job-cancel",
                                                                   textContent: "\u00d7" });
  text.addEventListener("click", () => showJob(job.id));
  cancel.addEventListener("click", () => cancelJob(job.id));
  li.append(state, text, detail, cancel);
  return li;
}

function fill(li, job) {
  const [state, text, detail, cancel] = li.children;
  li.dataset.state = job.state;
  state.textContent = job.state;
  text.textContent = jobText(job) || "(no prompt)";
  text.title = job.n_images ? "Show its images" : jobText(job);
  text.disabled = !job.n_images || !shown.has(job.id);
  detail.textContent = describe(job);
  cancel.hidden = isFinished(job);
  cancel.setAttribute("aria-label", `Cancel job: ${jobText(job) || job.id}`);
  cancel.title = job.state === "running" ? "Stop this job (finished images are kept)" : "Remove from the queue";
}

// Running first, then queued in their order, then the latest finished, newest first. Rows are kept and
// refilled (not rebuilt), so a click on a cancel button is never lost to a progress event.
function render() {
  const all = [...jobs.values()];
  const open = openJobs();
  const done = all.filter(isFinished).reverse().slice(0, FINISHED_SHOWN);
  const list = $("queue-list");
  const rows = new Map([...list.children].map((li) => [li.dataset.id, li]));
  const wanted = open.concat(done).map((job) => {
    const li = rows.get(job.id) || row(job);
    fill(li, job);
    return li;
  });
  wanted.forEach((li, i) => { if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null); });
  while (list.children.length > wanted.length) list.lastElementChild.remove();
  $("queue-view").hidden = !wanted.length;
  const queued = open.length - all.filter((j) => j.state === "running").length;
  $("queue-counts").textContent = open.length ? `${open.length - queued} running \u00b7 ${queued} queued` : "";
}
