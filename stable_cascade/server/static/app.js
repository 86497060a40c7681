// The page: a form that posts jobs to /v1/jobs, live progress from their event stream, and a gallery.
"use strict";

const $ = (id) => document.getElementById(id);
const NUMBERS = ["width", "height", "prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance",
  "batch_size", "count", "strength"];
const INTEGERS = new Set(["width", "height", "prior_steps", "decoder_steps", "batch_size", "count"]);
let info = null;
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

async function loadInfo() {
  info = await (await api("/v1/info")).json();
  $("model").replaceChildren(...Object.entries(info.models).map(([name, model]) => {
    const option = new Option(name, name, false, name === info.model);
    option.title = model.description;
    return option;
  }));
  $("preset").replaceChildren(...Object.keys(info.presets).map((name) => new Option(name, name, false, name === "reference")));
  for (const sampler of info.samplers) {
    $("sampler").append(new Option(sampler.name, sampler.aliases[0]));
    $("decoder_sampler").append(new Option(sampler.name, sampler.aliases[0]));
  }
  applyPreset();
  applyModel();
}

function applyPreset() {
  const preset = info.presets[$("preset").value];
  $("prior_steps").placeholder = preset.prior.num_inference_steps;
  $("prior_guidance").placeholder = preset.prior.guidance_scale;
  $("decoder_steps").placeholder = preset.decoder.num_inference_steps;
  $("decoder_guidance").placeholder = preset.decoder.guidance_scale;
}

function applyModel() {
  const model = info.models[$("model").value];
  const size = model.size || 1024;
  $("width").placeholder = size;
  $("height").placeholder = size;
  const chosen = $("controlnet").value;
  const names = model.controlnets || [];
  $("controlnet").replaceChildren(new Option("none", ""), ...names.map((name) => new Option(name, name)));
  $("controlnet").value = names.includes(chosen) ? chosen : "";
  $("controlnet").disabled = names.length === 0;
  $("control-none").hidden = names.length > 0;
  applyControl();
}

// The control inputs show once a ControlNet is chosen; the mask only for inpainting.
function applyControl() {
  const controlnet = $("controlnet").value;
  $("control-inputs").hidden = controlnet === "";
  $("mask-box").hidden = controlnet !== "inpainting";
}

function showThumb(input, thumb) {
  const file = $(input).files[0];
  if ($(thumb).src) URL.revokeObjectURL($(thumb).src);
  $(thumb).hidden = !file;
  if (file) $(thumb).src = URL.createObjectURL(file);
  else $(thumb).removeAttribute("src");
}

function applyTask() {
  const task = $("task").value;
  $("image-box").hidden = task === "txt2img";
  $("strength-box").hidden = task !== "img2img";
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function formJob() {
  const task = $("task").value;
  const job = { task, model: $("model").value, preset: $("preset").value,
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
  for (const name of NUMBERS) {
    const value = $(name).value.trim();
    if (value !== "" && !$(name).closest("[hidden]")) job[name] = INTEGERS.has(name) ? parseInt(value, 10) : parseFloat(value);
  }
  if (!$("random-seed").checked && $("seed").value.trim() !== "") job.seed = parseInt($("seed").value, 10);
  if ($("sampler").value) { job.prior_sampler = $("sampler").value; job.decoder_sampler = $("sampler").value; }
  if ($("decoder_sampler").value) job.decoder_sampler = $("decoder_sampler").value;
  if (task !== "txt2img") {
    const file = $("image").files[0];
    if (!file) throw new Error("choose an input image for " + task);
    job.image = await readFile(file);
    job.input_image = file.name;
  }
  await addControl(job);
  return job;
}

// The native API's control fields: controlnet, control_image and mask (data URLs), control_scale.
async function addControl(job) {
  const controlnet = $("controlnet").value;
  if (!controlnet) return;
  const image = $("control_image").files[0];
  if (!image) throw new Error(`choose a control image for the ${controlnet} ControlNet (or set ControlNet to none)`);
  job.controlnet = controlnet;
  job.control_image = await readFile(image);
  const scale = $("control_scale").value.trim();
  if (scale !== "") job.control_scale = parseFloat(scale);
  const mask = $("mask").files[0];
  if (controlnet === "inpainting" && mask) job.mask = await readFile(mask);
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

function reuse(job) {
  const fields = { task: job.task, prompt: job.prompt, negative_prompt: job.negative_prompt, width: job.width,
    height: job.height, preset: job.preset, batch_size: job.batch_size, count: job.count, strength: job.strength ?? "" };
  if (job.prior) Object.assign(fields, { prior_steps: job.prior.steps, prior_guidance: job.prior.guidance });
  Object.assign(fields, { decoder_steps: job.decoder.steps, decoder_guidance: job.decoder.guidance });
  for (const [name, value] of Object.entries(fields)) $(name).value = value;
  if (info.models[job.models.model]) { $("model").value = job.models.model; applyModel(); }
  $("seed").value = job.seed;
  $("random-seed").checked = false;
  const sampler = job.prior ? job.prior.sampler : job.decoder.sampler;
  $("sampler").value = [...$("sampler").options].some((o) => o.value === sampler) ? sampler : "";
  $("decoder_sampler").value = job.decoder.sampler !== $("sampler").value ? job.decoder.sampler : "";
  reuseControl(job.controls || []);
  applyTask();
  applyPreset();
  window.scrollTo(0, 0);
}

// The ControlNet and its scale come back; its images cannot (the browser may not set a file input).
function reuseControl(controls) {
  const control = controls[0];
  const offered = control && [...$("controlnet").options].some((o) => o.value === control.controlnet);
  $("controlnet").value = offered ? control.controlnet : "";
  $("control_scale").value = control ? control.scale : 1;
  applyControl();
  if (control) $("control-box").open = true;
  $("control-hint").textContent = !control ? "" : offered
    ? `re-upload the control image${control.mask ? " and the mask" : ""} of the job you reuse`
    : `this model has no ${control.controlnet} ControlNet`;
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
  $("task").addEventListener("change", applyTask);
  $("preset").addEventListener("change", applyPreset);
  $("model").addEventListener("change", applyModel);
  $("controlnet").addEventListener("change", applyControl);
  $("control_image").addEventListener("change", () => { showThumb("control_image", "control-thumb"); $("control-hint").textContent = ""; });
  $("mask").addEventListener("change", () => showThumb("mask", "mask-thumb"));
  $("random-seed").addEventListener("change", () => { if ($("random-seed").checked) $("seed").value = ""; });
  $("seed").addEventListener("input", () => { $("random-seed").checked = $("seed").value === ""; });
  $("cancel").addEventListener("click", () => currentJob && cancel(currentJob));
  $("save-key").addEventListener("click", () => {
    localStorage.setItem("stable-cascade-key", $("api-key").value);
    $("key-box").hidden = true;
    showError(null);
    loadInfo().then(refreshGallery).catch(showError);
  });
  applyTask();
  loadInfo().then(refreshGallery).catch(showError);
}

start();
