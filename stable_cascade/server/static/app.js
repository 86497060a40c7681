// The page: the form (form.js) posts jobs to /v1/jobs, live progress from their event stream, and a gallery.
"use strict";

const $ = (id) => document.getElementById(id);
let currentJob = null;

function apiKey() { return localStorage.getItem("stable-cascade-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs its API key: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

async function imageUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function showError(error) { $("error").textContent = error ? String(error.message || error) : ""; }

async function loadForm() {
  const info = await (await api("/v1/info")).json();
  const { fields } = await (await api("/v1/fields")).json();
  buildForm(fields, info);
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  try {
    const job = await formJob();
    const stored = await (await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(job) })).json();
    follow(stored.id);
    refreshGallery();
  } catch (error) { showError(error); }
}

async function follow(id) {
  currentJob = id;
  $("cancel").disabled = false;
  $("result").replaceChildren();
  $("progress").value = 0;
  $("progress-text").textContent = "queued";
  try {
    await readEvents(id, (type, data) => onEvent(id, type, data));
  } catch (error) { showError(error); }
  if (currentJob === id) { $("cancel").disabled = true; currentJob = null; }
  refreshGallery();
}

// Server-sent events read with fetch (EventSource cannot send the API key).
async function readEvents(id, handle) {
  const response = await api(`/v1/jobs/${id}/events`);
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
      if (data) {
        const message = JSON.parse(data);
        await handle(message.type, message);
      }
    }
  }
}

async function onEvent(id, type, data) {
  if (currentJob !== id) return;
  const text = $("progress-text");
  if (type === "queued") text.textContent = data.position === 0 ? "next in the queue" : `queued: ${data.position} job(s) ahead`;
  else if (type === "started") text.textContent = "starting";
  else if (type === "loading") text.textContent = "loading " + data.models;
  else if (type === "progress") {
    $("progress").value = data.fraction;
    const stage = data.stage === "prior" ? "Stage C" : "Stage B";
    text.textContent = `${stage} step ${data.step}/${data.steps}, batch ${data.batch + 1}/${data.batches}`;
  } else if (type === "preview") {
    $("preview").src = "data:image/png;base64," + data.image;
    $("preview").hidden = false;
  } else if (type === "image") {
    const img = document.createElement("img");
    img.alt = `image ${data.n}, seed ${data.seed}`;
    img.className = "output";
    img.src = await imageUrl(`/v1/jobs/${id}/images/${data.n}`);
    $("result").append(img);
  } else if (type === "done" || type === "failed" || type === "cancelled") {
    $("preview").hidden = true;
    if (type === "done") $("progress").value = 1;
    text.textContent = type === "failed" ? "failed: " + data.error : type;
  }
}

async function cancel(id) {
  try { await api(`/v1/jobs/${id}`, { method: "DELETE" }); } catch (error) { showError(error); }
}

function button(label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", action);
  return b;
}

async function card(job) {
  const box = document.createElement("div");
  box.className = "card";
  box.dataset.id = job.id;
  const prompt = document.createElement("div");
  prompt.className = "prompt";
  prompt.textContent = job.job.prompt || `(${job.job.task}, no prompt)`;
  const state = document.createElement("div");
  state.className = "meta state-" + job.state;
  state.textContent = job.state + (job.error ? ": " + job.error : "");
  const images = document.createElement("div");
  images.className = "images";
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(button("Reuse parameters", () => reuse(job.job)));
  if (job.state === "queued" || job.state === "running") actions.append(button("Cancel", () => cancel(job.id)));
  for (const image of job.images) {
    const img = document.createElement("img");
    img.alt = `seed ${image.seed}`;
    img.title = image.infotext;
    img.src = await imageUrl(image.url);
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `${job.id.slice(0, 8)}-${image.seed}.png`;
    link.textContent = `Download ${image.seed}`;
    images.append(img);
    actions.append(link);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = job.images.length ? job.images[0].infotext.split("\n").slice(1).join("\n") : "";
  box.append(prompt, state, images, meta, actions);
  return box;
}

let refreshing = false;
async function refreshGallery() {
  if (refreshing) return;
  refreshing = true;
  try {
    const { jobs } = await (await api("/v1/jobs?limit=24")).json();
    const cards = [];
    for (const job of jobs) cards.push(await card(job));
    $("gallery").replaceChildren(...cards);
    $("status").textContent = `${jobs.filter((j) => j.state === "queued" || j.state === "running").length} job(s) in the queue`;
  } catch (error) { showError(error); } finally { refreshing = false; }
}

function start() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => currentJob && cancel(currentJob));
  $("save-key").addEventListener("click", () => {
    localStorage.setItem("stable-cascade-key", $("api-key").value);
    $("key-box").hidden = true;
    showError(null);
    loadForm().then(refreshGallery).catch(showError);
  });
  loadForm().then(refreshGallery).catch(showError);
}

start();
