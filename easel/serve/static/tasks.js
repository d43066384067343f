// What the Animate and Extras tabs share: following one task job over its event stream (progress, previews, the
// end), a progress bar of their own, and the newest job of a kind after a reload.
import { $, api } from "./form.js";

export const FINISHED = ["done", "failed", "cancelled", "interrupted"];

// Follow job `id`: onProgress(event) for each progress event (its task's progress under `task`), onPreview(base64
// PNG), onDone(job summary) once. A broken stream is retried by reading the job again. Returns a stop function.
export function followJob(id, { onProgress, onPreview, onDone }) {
  let events = null;
  let stopped = false;
  const open = () => {
    events = new EventSource(`/api/v1/jobs/${id}/events`);
    events.addEventListener("progress", (e) => onProgress(JSON.parse(e.data)));
    if (onPreview) events.addEventListener("preview", (e) => onPreview(JSON.parse(e.data).image));
    events.addEventListener("done", (e) => { events.close(); stopped = true; onDone(JSON.parse(e.data)); });
    events.onerror = () => {
      events.close();
      setTimeout(async () => {
        if (stopped) return;
        try {
          const job = await api(`/api/v1/jobs/${id}`);
          if (FINISHED.includes(job.state)) { stopped = true; onDone(job); } else open();
        } catch (e) { stopped = true; onDone({ id, state: "failed", error: e.message }); }
      }, 2000);
    };
  };
  open();
  return () => { stopped = true; if (events) events.close(); };
}

// The newest job of a kind (null when there is none, or the server cannot say).
export async function latestJob(kind) {
  try {
    const [job] = await api(`/api/v1/jobs?kind=${encodeURIComponent(kind)}&limit=1`);
    return job || null;
  } catch (e) {
    return null;
  }
}

// A progress bar `${prefix}-progress` / `${prefix}-fill`: filled to step / total, coloured by state.
export function setBar(prefix, state, step, total) {
  $(`${prefix}-progress`).dataset.state = state;
  const fill = state === "done" ? 100 : total ? Math.min(100, (100 * step) / total) : 0;
  $(`${prefix}-fill`).style.width = `${fill.toFixed(1)}%`;
}

export const seconds = (s) => (s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);

// The inline error box `${prefix}-error` (empty text hides it).
export function inlineError(prefix, message) {
  const box = $(`${prefix}-error`);
  box.textContent = message || "";
  box.hidden = !message;
}

export async function cancelTask(id, onError) {
  try {
    await api(`/api/v1/jobs/${id}`, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 409) onError(e.message);  // 409: it finished meanwhile; its done event follows
  }
}
