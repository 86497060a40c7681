// The page: the form (form.js) posts jobs to /v1/jobs; the stream of every job (/v1/events) keeps the
// queue count, the gallery (gallery.js) and the current job live, whoever submitted them; a reload
// follows the job that is running; PNG Info and dropped PNGs restore their settings.
"use strict";

let currentJob = null;

function apiKey() { return localStorage.getItem("stable-cascade-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (error) {
    throw new Error("the server cannot be reached; is it still running?");
  }
  if (response.status === 401) {
    byId("key-box").hidden = false;
    throw new Error("this server needs its API key: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (error) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

function postJson(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function showError(error) { byId("error").textContent = error ? String(error.message || error) : ""; }

async function loadForm() {
  const info = await (await api("/v1/info")).json();
  const { fields } = await (await api("/v1/fields")).json();
  buildForm(fields, info);
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  try {
    const stored = await (await postJson("/v1/jobs", await formJob())).json();
    follow(stored.id);
    Gallery.soon();
  } catch (error) { showError(error); }
}

// Progress, previews and images of job ``id`` (one followed at a time), from its event stream.
async function follow(id) {
  if (currentJob === id) return;
  currentJob = id;
  byId("cancel").disabled = false;
  byId("result").replaceChildren();
  byId("progress").value = 0;
  byId("progress-text").textContent = "queued";
  try {
    await readEvents(`/v1/jobs/${id}/events`, (message) => onEvent(id, message));
  } catch (error) { if (currentJob === id) showError(error); }
  if (currentJob === id) { byId("cancel").disabled = true; currentJob = null; }
  Gallery.soon();
}

// Server-sent events read with fetch (EventSource cannot send the API key).
async function readEvents(path, handle) {
  const response = await api(path);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) await handle(JSON.parse(data));
    }
  }
}

async function onEvent(id, data) {
  if (currentJob !== id) return;
  const text = byId("progress-text");
  const type = data.type;
  if (type === "queued") text.textContent = data.position === 0 ? "next in the queue" : `queued: ${data.position} job(s) ahead`;
  else if (type === "started") text.textContent = "starting";
  else if (type === "loading") text.textContent = "loading " + data.models;
  else if (type === "progress") {
    byId("progress").value = data.fraction;
    const stage = data.stage === "prior" ? "Stage C" : "Stage B";
    text.textContent = `${stage} step ${data.step}/${data.steps}, batch ${data.batch + 1}/${data.batches}`;
  } else if (type === "preview") {
    byId("preview").src = "data:image/png;base64," + data.image;
    byId("preview").hidden = false;
  } else if (type === "image") {
    const blob = await (await api(`/v1/jobs/${id}/images/${data.n}`)).blob();
    byId("result").append(element("img", { alt: `image ${data.n}, seed ${data.seed}`, className: "output", src: URL.createObjectURL(blob) }));
  } else if (type === "done" || type === "failed" || type === "cancelled") {
    byId("preview").hidden = true;
    if (type === "done") byId("progress").value = 1;
    text.textContent = type === "failed" ? "failed: " + data.error : type;
  }
}

async function cancel(id) {
  try { await api(`/v1/jobs/${id}`, { method: "DELETE" }); } catch (error) { showError(error); }
}

function showQueue(count) { byId("status").textContent = `${count} job(s) in the queue`; }

// Every job's news: the queue count, the gallery, and a job that starts while none is followed (from
// any client) is followed. Reconnects when the stream ends (the server restarted).
async function watchAll() {
  for (let wait = 1000; ; wait = Math.min(2 * wait, 10_000)) {
    try {
      await readEvents("/v1/events", (message) => {
        wait = 1000;
        if ("queue" in message) showQueue(message.queue);
        if (message.type === "started" && currentJob === null) follow(message.id);
        if (["queued", "started", "image", "done", "failed", "cancelled", "deleted"].includes(message.type)) Gallery.soon();
      });
    } catch (error) { /* the server is away: try again */ }
    await new Promise((resolve) => setTimeout(resolve, wait));
    Gallery.soon();
  }
}

// A reload (or a job submitted elsewhere before the page opened): follow the job that runs.
async function followRunning() {
  const { jobs } = await (await api("/v1/jobs?limit=50")).json();
  const running = jobs.find((job) => job.state === "running");
  showQueue(jobs.filter((job) => job.state === "queued" || job.state === "running").length);
  if (running) follow(running.id);
}

// The prompt's token count, as its model encodes it (AUTOMATIC1111's "12/75").
let tokenTimer = null;
function countTokens() {
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(async () => {
    const body = { prompt: byId("prompt").value, model: byId("model").value, emphasis: byId("emphasis").value };
    try {
      const { tokens, capacity } = await (await postJson("/v1/tokens", body)).json();
      byId("prompt-tokens").textContent = `${tokens}/${capacity}`;
    } catch (error) { byId("prompt-tokens").textContent = ""; }
  }, 300);
}

// PNG Info: a PNG's parameters shown, and its settings back into the form (a dropped PNG at once).
let pngSettings = null;
async function readPng(file, restore) {
  showError(null);
  try {
    const info = await (await postJson("/v1/png-info", { image: await readFile(file) })).json();
    byId("png-info").open = true;
    byId("png-text").textContent = info.infotext || info.error || "this PNG carries no parameters";
    pngSettings = info.job ? info : null;
    byId("png-restore").hidden = !pngSettings;
    if (!info.job && restore) throw new Error(`${file.name} has no settings to restore: ${info.error}`);
    if (pngSettings && restore) reuse(info.job, info);
  } catch (error) { showError(error); }
}

function acceptDrops() {
  let depth = 0;
  const carriesFiles = (event) => [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (event) => { if (carriesFiles(event)) { depth += 1; byId("drop-hint").hidden = false; } });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) byId("drop-hint").hidden = true; });
  document.addEventListener("dragover", (event) => { if (carriesFiles(event)) event.preventDefault(); });
  document.addEventListener("drop", (event) => {
    depth = 0;
    byId("drop-hint").hidden = true;
    const file = event.dataTransfer.files[0];
    if (!file || event.target.type === "file") return; // a drop on a file input fills that input
    event.preventDefault();
    readPng(file, true);
  });
}

function start() {
  byId("form").addEventListener("submit", generate);
  byId("cancel").addEventListener("click", () => currentJob && cancel(currentJob));
  byId("png-file").addEventListener("change", () => byId("png-file").files[0] && readPng(byId("png-file").files[0], false));
  byId("png-restore").addEventListener("click", () => pngSettings && reuse(pngSettings.job, pngSettings));
  byId("save-key").addEventListener("click", () => {
    localStorage.setItem("stable-cascade-key", byId("api-key").value);
    byId("key-box").hidden = true;
    showError(null);
    begin();
  });
  Gallery.start();
  acceptDrops();
  begin();
}

let watching = false;
async function begin() {
  try {
    await loadForm();
    byId("prompt").addEventListener("input", countTokens);
    byId("emphasis").addEventListener("change", countTokens);
    countTokens();
    await Gallery.refresh();
    await followRunning();
    if (!watching) { watching = true; watchAll(); }
  } catch (error) { showError(error); }
}

start();
