// lipdub web page: upload, follow and play lip-sync jobs through the HTTP API.
// Plain browser JavaScript, no build step. Every user-provided text is set with textContent.
// The token goes only into Authorization headers; the <video> and the download link use
// short-lived signed URLs from POST /api/jobs/{id}/link, renewed when they run out.
"use strict";

const STAGES = {
  queued: "waiting in the queue",
  starting: "loading",
  scan: "finding the face",
  render: "lip-syncing",
  cancelling: "cancelling",
  done: "done",
  failed: "failed",
  cancelled: "cancelled",
};
const FINISHED = new Set(["done", "failed", "cancelled"]);

const state = {
  token: localStorage.getItem("lipdub-token") || "",
  files: { face: null, audio: null },
  selected: null, // job id
  shownResult: null, // job id whose result the <video> shows
  link: null, // {job, url, download_url, expires_at} of the shown result
  jobTimer: null,
  listTimer: null,
  info: null,
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 204) return null;
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    if (response.status === 401) showTokenBar();
    throw new ApiError(response.status, (body && body.detail) || `HTTP ${response.status}`);
  }
  return body;
}

function showTokenBar() {
  $("token-bar").hidden = false;
}

// ------------------------------------------------------------------ files and drop zones

function setFile(role, file) {
  if (!file) return;
  state.files[role] = file;
  $(`${role}-file`).textContent = `${file.name} (${formatSize(file.size)})`;
  $(`${role}-drop`).classList.add("ready");
  $("form-error").textContent = "";
}

function formatSize(n) {
  if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${n} B`;
}

function setupDrop(role) {
  const zone = $(`${role}-drop`);
  const input = $(`${role}-input`);
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => setFile(role, input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) setFile(role, files[0]);
  });
}

// ------------------------------------------------------------------ submit

function formData() {
  const data = new FormData();
  data.append("face", state.files.face, state.files.face.name);
  data.append("audio", state.files.audio, state.files.audio.name);
  data.append("blend", $("opt-blend").value);
  data.append("silence", $("opt-silence").value);
  data.append("mask_scale", $("opt-mask-scale").value.trim() || "1.0");
  const restore = $("opt-restore").value;
  if (restore) data.append("restore", restore);
  const pads = ["top", "bottom", "left", "right"].map((side) => $(`pad-${side}`).value.trim() || "0");
  data.append("pads", pads.join(" "));
  const faceIndex = $("opt-face-index").value.trim();
  if (faceIndex !== "") data.append("face_index", faceIndex);
  return data;
}

function submit(event) {
  event.preventDefault();
  const error = $("form-error");
  error.textContent = "";
  if (!state.files.face || !state.files.audio) {
    error.textContent = !state.files.face ? "Choose a face video or image first." : "Choose an audio file first.";
    return;
  }
  const limit = state.info ? state.info.max_upload_mb * 1024 * 1024 : Infinity;
  if (state.files.face.size + state.files.audio.size > limit) {
    error.textContent = `The files are larger than this server accepts (${state.info.max_upload_mb} MB together).`;
    return;
  }
  const button = $("submit");
  const bar = $("upload-progress");
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/jobs");
  for (const [key, value] of Object.entries(headers())) xhr.setRequestHeader(key, value);
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) bar.value = e.loaded / e.total;
  });
  xhr.addEventListener("loadend", () => {
    button.disabled = false;
    bar.hidden = true;
    let body = null;
    try {
      body = JSON.parse(xhr.responseText);
    } catch (err) {
      body = null;
    }
    if (xhr.status === 202 || xhr.status === 201) {
      selectJob(body.id);
      refreshList();
    } else if (xhr.status === 0) {
      error.textContent = "The upload failed (connection lost).";
    } else {
      if (xhr.status === 401) showTokenBar();
      error.textContent = (body && body.detail) || `Upload failed (HTTP ${xhr.status}).`;
    }
  });
  xhr.send(formData());
}

// ------------------------------------------------------------------ one job

function selectJob(id) {
  state.selected = id;
  if (location.hash !== `#job=${id}`) history.replaceState(null, "", `#job=${id}`);
  clearTimeout(state.jobTimer);
  refreshJob();
  for (const row of document.querySelectorAll("#jobs tr")) row.classList.toggle("selected", row.dataset.id === id);
}

async function refreshJob() {
  const id = state.selected;
  if (!id) return;
  let job;
  try {
    job = await api(`/api/jobs/${encodeURIComponent(id)}`);
  } catch (err) {
    if (id !== state.selected) return;
    if (err.status === 404) {
      clearJob();
      return;
    }
    state.jobTimer = setTimeout(refreshJob, 2000);
    return;
  }
  if (id !== state.selected) return;
  showJob(job);
  if (!FINISHED.has(job.status)) state.jobTimer = setTimeout(refreshJob, 500);
}

function clearJob() {
  state.selected = null;
  state.shownResult = null;
  state.link = null;
  $("job").hidden = true;
  const video = $("job-video");
  video.removeAttribute("src");
  video.load();
  video.hidden = true;
  history.replaceState(null, "", location.pathname);
}

function showJob(job) {
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  const status = $("job-status");
  status.textContent = job.status;
  status.className = `status ${job.status}`;
  let stage = STAGES[job.stage] || job.stage;
  if (job.status === "queued" && job.queue_position) stage = `${job.queue_position} job(s) ahead`;
  if (job.status === "done" && job.result) {
    const r = job.result;
    stage = `${r.n_frames} frames, ${r.width}×${r.height}` + (r.seconds ? ` in ${r.seconds.toFixed(1)} s` : "") +
      (r.face_size ? `, ${r.face_size}×${r.face_size} model` : "");
  }
  if (job.status === "failed" || job.status === "cancelled") stage = "";
  $("job-stage").textContent = stage;
  $("job-names").textContent = `${job.face_name} + ${job.audio_name}`;
  $("job-progress").value = job.progress;
  $("job-percent").textContent = `${Math.round(job.progress * 100)}%`;
  $("job-error").textContent = job.error || "";
  $("job-cancel").hidden = FINISHED.has(job.status) || job.cancel_requested;
  $("job-delete").hidden = job.status === "running";
  const video = $("job-video");
  const download = $("job-download");
  if (job.status === "done" && job.result_url) {
    if (state.shownResult !== job.id) {
      state.shownResult = job.id;
      state.link = null;
      download.hidden = true;
      showResult(job.id);
    }
  } else {
    if (state.shownResult) {
      state.shownResult = null;
      state.link = null;
      video.removeAttribute("src");
      video.load();
    }
    video.hidden = true;
    download.hidden = true;
  }
}

// A signed link of a done job's result; null when the job is no longer the one shown.
async function resultLink(id) {
  let link;
  try {
    link = await api(`/api/jobs/${encodeURIComponent(id)}/link`, { method: "POST" });
  } catch (err) {
    if (state.shownResult === id) $("job-error").textContent = err.message;
    return null;
  }
  if (state.shownResult !== id) return null;
  state.link = { job: id, ...link };
  $("job-download").href = link.download_url;
  return link;
}

function linkFresh(id) {
  return state.link && state.link.job === id && state.link.expires_at - Date.now() / 1000 > 30;
}

async function showResult(id, at = 0) {
  const link = await resultLink(id);
  if (!link) return;
  const video = $("job-video");
  if (at > 0) video.addEventListener("loadedmetadata", () => (video.currentTime = at), { once: true });
  video.src = link.url;
  video.hidden = false;
  $("job-download").hidden = false;
}

// The link ran out (or the server restarted) while the video was open: a new link, same position.
// At most one try in 10 s, so that a result the browser cannot play does not loop.
function videoFailed() {
  const id = state.shownResult;
  const video = $("job-video");
  if (!id || !video.getAttribute("src")) return;
  const now = Date.now();
  if (state.videoRetryAt && now - state.videoRetryAt < 10000) return;
  state.videoRetryAt = now;
  showResult(id, video.currentTime || 0);
}

async function downloadClicked(event) {
  const id = state.shownResult;
  if (!id || linkFresh(id)) return; // the link in href is still good
  event.preventDefault();
  const link = await resultLink(id);
  if (link) location.assign(link.download_url);
}

async function cancelSelected() {
  if (!state.selected) return;
  try {
    showJob(await api(`/api/jobs/${encodeURIComponent(state.selected)}/cancel`, { method: "POST" }));
    clearTimeout(state.jobTimer);
    state.jobTimer = setTimeout(refreshJob, 300);
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

async function deleteSelected() {
  const id = state.selected;
  if (!id) return;
  try {
    await api(`/api/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
    clearTimeout(state.jobTimer);
    clearJob();
    refreshList();
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

// ------------------------------------------------------------------ job list

async function refreshList() {
  clearTimeout(state.listTimer);
  try {
    const data = await api("/api/jobs?limit=50");
    renderList(data);
  } catch (err) {
    // shown elsewhere (token bar); try again later
  }
  state.listTimer = setTimeout(refreshList, 1500);
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function renderList(data) {
  const tbody = $("jobs");
  const rows = [];
  for (const job of data.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.id = job.id;
    tr.dataset.status = job.status;
    if (job.id === state.selected) tr.className = "selected";
    tr.append(cell(new Date(job.created_at * 1000).toLocaleString()), cell(job.face_name), cell(job.audio_name));
    const status = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `status ${job.status}`;
    badge.textContent = job.status;
    status.append(badge);
    tr.append(status);
    const progressCell = document.createElement("td");
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = job.progress;
    progressCell.append(bar);
    tr.append(progressCell);
    tr.addEventListener("click", () => selectJob(job.id));
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  $("jobs-empty").hidden = rows.length > 0;
  const c = data.counts;
  $("job-counts").textContent = `${c.queued} queued, ${c.running} running, ${c.done} done`;
}

// ------------------------------------------------------------------ start

async function loadInfo() {
  try {
    const info = await api("/api/info");
    state.info = info;
    $("token-bar").hidden = true;
    $("server-info").textContent = `model ${info.checkpoint} · ${info.workers} worker(s) · up to ${info.max_upload_mb} MB`;
    const restore = $("opt-restore");
    restore.disabled = !info.restore_available;
    if (!info.restore_available) restore.title = "not available on this server";
    return true;
  } catch (err) {
    return false;
  }
}

async function tokenRequired() {
  try {
    const response = await fetch("/healthz");
    return (await response.json()).token_required === true;
  } catch (err) {
    return false;
  }
}

async function start() {
  setupDrop("face");
  setupDrop("audio");
  // a file dropped outside the zones must not make the browser navigate away
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("job-form").addEventListener("submit", submit);
  $("job-cancel").addEventListener("click", cancelSelected);
  $("job-delete").addEventListener("click", deleteSelected);
  $("job-video").addEventListener("error", videoFailed);
  $("job-download").addEventListener("click", downloadClicked);
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.token = $("token-input").value.trim();
    localStorage.setItem("lipdub-token", state.token);
    const ok = await loadInfo();
    $("token-error").textContent = ok ? "" : "This token was refused.";
    if (ok) {
      refreshList();
      const match = location.hash.match(/^#job=([A-Za-z0-9_-]{22})$/);
      if (state.selected) refreshJob();
      else if (match) selectJob(match[1]);
    }
  });
  if (!state.token && (await tokenRequired())) {
    showTokenBar(); // ask before calling the API, so that no request fails
    return;
  }
  if (!(await loadInfo())) return; // waits for a (new) token
  const match = location.hash.match(/^#job=([A-Za-z0-9_-]{22})$/);
  if (match) selectJob(match[1]);
  refreshList();
}

document.addEventListener("DOMContentLoaded", start);
