// The form, built from the job field table (GET /v1/fields): one control per field, with the field's
// name as its id, grouped as the table groups them (the prompt's group above the Generate button); the
// job it sends and "Reuse parameters" read and write the same names.
"use strict";

const byId = (id) => document.getElementById(id);
let FIELDS = [];
let MODELS = {};
let LORAS = [];

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// One control of a field: a number, a text area, a select, an image upload or the LoRA picker.
function control(field) {
  if (field.widget === "textarea") return element("textarea", { id: field.name, rows: field.name === "prompt" ? 3 : 2 });
  if (field.widget === "image") return element("input", { id: field.name, type: "file", accept: "image/*" });
  if (field.widget === "loras") return loraPicker();
  if (field.widget === "select") {
    const select = element("select", { id: field.name });
    const empty = field.presets && Object.keys(field.presets).length ? "preset's" : field.derived ? "default" : null;
    if (empty) select.append(new Option(empty, ""));
    for (const value of field.choices) select.append(new Option(field.choice_names[value] || value, value));
    if (!empty && field.default !== null) select.value = field.default;
    return select;
  }
  const input = element("input", { id: field.name, type: "number" });
  if (field.low !== null) input.min = field.low;
  if (field.high !== null) input.max = field.high;
  const side = field.name === "width" || field.name === "height";
  input.step = field.kind === "int" ? (side ? 8 : 1) : "any";
  if (side) input.min = Math.max(8, Math.ceil((field.low || 8) / 8) * 8); // steps count from the minimum
  if (!field.derived && field.default !== null) input.value = field.default;
  else if (field.default !== null) input.placeholder = field.name === "seed" ? "random" : field.default;
  return input;
}

// The LoRA picker: the server's LoRAs by name, each chosen one with its weight.
function loraPicker() {
  const pick = element("select", { id: "lora-pick" });
  const weight = element("input", { id: "lora-weight", type: "number", step: "0.05", value: "1", title: "weight" });
  const add = element("button", { type: "button", id: "lora-add", textContent: "Add" });
  add.addEventListener("click", () => addLora(pick.value, parseFloat(weight.value)));
  return element("div", { id: "loras" }, element("div", { className: "row" }, pick, weight, add),
    element("ul", { id: "lora-list" }), element("p", { id: "lora-hint", className: "hint" }));
}

function addLora(name, scale) {
  if (!name || !Number.isFinite(scale)) return;
  const known = [...byId("lora-list").children].find((item) => item.dataset.name === name);
  if (known) { known.querySelector("input").value = scale; return; }
  const remove = element("button", { type: "button", textContent: "×", title: "remove" });
  const item = element("li", {}, element("span", {}, name), element("input", { type: "number", step: "0.05", value: scale }), remove);
  item.dataset.name = name;
  remove.addEventListener("click", () => item.remove());
  byId("lora-list").append(item);
}

function chosenLoras() {
  return [...byId("lora-list").children].map((item) => ({ name: item.dataset.name, scale: parseFloat(item.querySelector("input").value) }));
}

function labelled(field) {
  const title = field.label[0].toUpperCase() + field.label.slice(1) + " ";
  const box = field.widget === "loras"
    ? element("div", { className: "lora-box" }, element("span", { className: "hint" }, title), control(field))
    : element("label", { title: field.help }, title, control(field));
  box.dataset.field = field.name;
  if (field.tasks.length) box.dataset.tasks = field.tasks.join(" ");
  if (field.name === "prompt") box.append(element("span", { id: "prompt-tokens", className: "hint", title: "tokens: the prompt's / what one encoding takes" }));
  if (field.widget === "image" && field.name !== "input_image") {
    const thumb = element("img", { id: field.name === "mask" ? "mask-thumb" : "control-thumb", className: "thumb", alt: field.label, hidden: true });
    const row = element("div", { className: "row", id: field.name === "mask" ? "mask-box" : "" }, box, thumb);
    row.dataset.field = field.name;
    if (field.name === "mask") return element("div", { id: "mask-area" }, row, Painter.element());
    return row;
  }
  return box;
}

function section(group, fields) {
  const items = fields.map(labelled);
  if (group === "ControlNet") {
    const select = items.shift();
    const inputs = element("div", { id: "control-inputs", hidden: true }, ...items, element("p", { id: "control-hint", className: "hint" }));
    return element("details", { id: "control-box" }, element("summary", {}, "ControlNet"), select,
      element("p", { id: "control-none", className: "hint", hidden: true }, "this model has no ControlNet"), inputs);
  }
  if (group === "Stage C" || group === "Stage B") {
    return element("fieldset", {}, element("legend", {}, group === "Stage C" ? "Stage C (prior)" : "Stage B (decoder)"),
      element("div", { className: "row" }, ...items));
  }
  if (group === "Size and seed") {
    const random = element("label", { className: "check" }, element("input", { id: "random-seed", type: "checkbox", checked: true }), " random");
    items.splice(3, 0, random);
  }
  return element("div", { className: group === "Prompt" ? "column" : "row", id: group === "Input image" ? "image-box" : "" }, ...items);
}

function buildForm(fields, info) {
  FIELDS = fields;
  MODELS = info.models;
  LORAS = info.loras;
  const groups = new Map();
  for (const field of fields) {
    if (field.name === "model") continue; // the header's select
    if (!groups.has(field.group)) groups.set(field.group, []);
    groups.get(field.group).push(field);
  }
  const sections = [...groups].map(([group, members]) => [group, section(group, members)]);
  byId("prompt-fields").replaceChildren(...sections.filter(([group]) => group === "Prompt").map(([, node]) => node));
  byId("fields").replaceChildren(...sections.filter(([group]) => group !== "Prompt").map(([, node]) => node));
  byId("prompt").placeholder = "a red circle on the left, on a white background";
  byId("model").replaceChildren(...Object.entries(info.models).map(([name, model]) => {
    const option = new Option(model.available ? name : `${name} (not downloaded)`, name, false, name === info.model);
    option.title = model.description;
    return option;
  }));
  byId("lora-pick").replaceChildren(...LORAS.map((name) => new Option(name, name)));
  byId("lora-pick").disabled = byId("lora-add").disabled = LORAS.length === 0;
  byId("lora-hint").textContent = LORAS.length ? "" : "this server has no LoRAs";
  byId("preset").value = fields.find((f) => f.name === "preset").default;
  byId("task").addEventListener("change", applyTask);
  byId("preset").addEventListener("change", applyPreset);
  byId("model").addEventListener("change", applyModel);
  byId("controlnet").addEventListener("change", applyControl);
  byId("control_image").addEventListener("change", () => { showThumb("control_image", "control-thumb"); byId("control-hint").textContent = ""; applyControl(); });
  byId("mask").addEventListener("change", () => showThumb("mask", "mask-thumb"));
  byId("random-seed").addEventListener("change", () => { if (byId("random-seed").checked) byId("seed").value = ""; });
  byId("seed").addEventListener("input", () => { byId("random-seed").checked = byId("seed").value === ""; });
  applyTask();
  applyModel();
}

// Fields for other tasks hide; so do the input image's when the task has none.
function applyTask() {
  const task = byId("task").value;
  for (const box of document.querySelectorAll("[data-tasks]")) box.hidden = !box.dataset.tasks.split(" ").includes(task);
  byId("image-box").hidden = task === "txt2img";
  applyPreset();
}

function applyPreset() {
  const preset = byId("preset").value;
  for (const field of FIELDS) {
    if (field.presets && preset in field.presets && byId(field.name).tagName === "INPUT") byId(field.name).placeholder = field.presets[preset];
  }
}

function applyModel() {
  const model = MODELS[byId("model").value];
  for (const side of ["width", "height"]) byId(side).placeholder = model.size || 1024;
  const note = byId("model-note");
  note.hidden = model.available;
  note.textContent = model.available ? "" : "not on this server yet: its first job downloads it, or fails offline";
  const chosen = byId("controlnet").value;
  const names = model.controlnets || [];
  byId("controlnet").replaceChildren(new Option("none", ""), ...names.map((name) => new Option(name, name)));
  byId("controlnet").value = names.includes(chosen) ? chosen : "";
  byId("controlnet").disabled = names.length === 0;
  byId("control-none").hidden = names.length > 0;
  applyControl();
  byId("prompt").dispatchEvent(new Event("input")); // another model counts tokens with its tokenizer
}

// The control inputs show once a ControlNet is chosen; the mask (and its painter) only for inpainting.
function applyControl() {
  const controlnet = byId("controlnet").value;
  byId("control-inputs").hidden = controlnet === "";
  byId("mask-area").hidden = controlnet !== "inpainting";
  Painter.show(controlnet === "inpainting" ? byId("control_image").files[0] : null);
}

function showThumb(input, thumb) {
  const file = byId(input).files[0];
  if (byId(thumb).src) URL.revokeObjectURL(byId(thumb).src);
  byId(thumb).hidden = !file;
  if (file) byId(thumb).src = URL.createObjectURL(file);
  else byId(thumb).removeAttribute("src");
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The job of the form: every shown field that has a value, by its name (uploads as data: URLs; a
// painted mask as a PNG; LoRAs by name with their weights).
async function formJob() {
  const job = { model: byId("model").value };
  for (const field of FIELDS) {
    const input = byId(field.name);
    if (!input || input.closest("[hidden]") || field.name === "model") continue;
    if (field.requires && !job[field.requires]) continue;
    if (field.widget === "loras") {
      const loras = chosenLoras();
      if (loras.length) job.loras = loras;
      continue;
    }
    if (field.name === "mask" && Painter.painted()) { job.mask = Painter.mask(); continue; }
    if (field.widget === "image") {
      const file = input.files[0];
      if (!file) {
        if (field.name === "input_image") throw new Error("choose an input image for " + job.task);
        if (field.name === "control_image") throw new Error(`choose a control image for the ${job.controlnet} ControlNet (or set ControlNet to none)`);
        if (field.name === "mask") throw new Error("paint the region to repaint over the control image, or choose a mask");
        continue;
      }
      if (field.name === "input_image") { job.image = await readFile(file); job.input_image = file.name; }
      else job[field.name] = await readFile(file);
      continue;
    }
    const value = input.value.trim();
    if (field.name === "seed" && byId("random-seed").checked) continue;
    if (value === "" && field.kind !== "text") continue;
    job[field.name] = field.kind === "int" ? parseInt(value, 10) : field.kind === "float" ? parseFloat(value) : input.value;
  }
  return job;
}

// "Reuse parameters": a job's fields back into the form, its models and LoRAs by the names the server
// gives them (uploads cannot be set: the hint asks for them).
function reuse(job, names = {}) {
  byId("task").value = job.task;
  const model = names.model_name || (job.prior ? null : job.model);
  if (MODELS[model]) { byId("model").value = model; applyModel(); }
  const control = names.controlnet_name || (job.controlnet && job.controlnet.split("/").pop());
  const offered = control && [...byId("controlnet").options].some((o) => o.value === control);
  for (const field of FIELDS) {
    const input = byId(field.name);
    if (!input || field.widget === "image" || field.widget === "loras" || field.name === "model" || field.name === "task") continue;
    if (field.name === "controlnet") { input.value = offered ? control : ""; continue; }
    const value = job[field.name];
    input.value = value === null || value === undefined ? (field.name === "control_scale" ? 1 : "") : value;
  }
  byId("lora-list").replaceChildren();
  const missing = [];
  (job.loras || []).forEach((lora, i) => {
    const name = (names.lora_names || [])[i];
    if (name && LORAS.includes(name)) addLora(name, lora.scale);
    else missing.push(lora.path.split("/").pop());
  });
  byId("lora-hint").textContent = missing.length ? `this server has no LoRA ${missing.join(", ")}` : "";
  byId("random-seed").checked = false;
  applyTask();
  applyControl();
  if (control) byId("control-box").open = true;
  byId("control-hint").textContent = !control ? "" : offered
    ? `re-upload the control image${job.mask ? " and the mask" : ""} of the job you reuse`
    : `this model has no ${control} ControlNet`;
  byId("prompt").dispatchEvent(new Event("input"));
  window.scrollTo(0, 0);
}
