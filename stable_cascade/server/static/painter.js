// The mask painter for inpainting: the control image with a canvas over it, painted white where new
// content is to be generated; the mask sent is that canvas at the image's own size, black elsewhere.
"use strict";

const Painter = (() => {
  let image = null; // the control image's canvas
  let mask = null; // the painted strokes, at the image's size
  let strokes = 0;
  let drawing = false;
  let url = null;

  function element() {
    image = document.createElement("canvas");
    image.id = "paint-image";
    mask = document.createElement("canvas");
    mask.id = "paint-mask";
    const size = Object.assign(document.createElement("input"), { id: "brush", type: "range", min: 2, max: 64, value: 16 });
    const clear = Object.assign(document.createElement("button"), { type: "button", id: "paint-clear", textContent: "Clear" });
    clear.addEventListener("click", reset);
    for (const type of ["pointerdown", "pointermove"]) mask.addEventListener(type, (event) => paint(event, type === "pointerdown"));
    for (const type of ["pointerup", "pointerleave", "pointercancel"]) mask.addEventListener(type, () => { drawing = false; });
    const tools = document.createElement("div");
    tools.className = "row";
    const brush = document.createElement("label");
    brush.className = "check";
    brush.append("Brush ", size);
    tools.append(brush, clear);
    const hint = Object.assign(document.createElement("p"), { className: "hint", textContent: "paint where new content goes (or choose a mask file)" });
    const box = Object.assign(document.createElement("div"), { id: "painter" });
    box.append(image, mask);
    const area = document.createElement("div");
    area.id = "painter-area";
    area.hidden = true;
    area.append(hint, box, tools);
    return area;
  }

  function reset() {
    strokes = 0;
    if (mask) mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  }

  // Show the painter over ``file`` (the control image), or hide it (null).
  function show(file) {
    const area = document.getElementById("painter-area");
    if (!file) { area.hidden = true; reset(); return; }
    if (url) URL.revokeObjectURL(url);
    url = URL.createObjectURL(file);
    const picture = new Image();
    picture.onload = () => {
      for (const canvas of [image, mask]) { canvas.width = picture.naturalWidth; canvas.height = picture.naturalHeight; }
      image.getContext("2d").drawImage(picture, 0, 0);
      reset();
      area.hidden = false;
    };
    picture.src = url;
  }

  function paint(event, start) {
    if (start) { drawing = true; mask.setPointerCapture(event.pointerId); }
    if (!drawing) return;
    const box = mask.getBoundingClientRect();
    const scale = mask.width / box.width;
    const context = mask.getContext("2d");
    context.fillStyle = "white";
    context.beginPath();
    const radius = (document.getElementById("brush").valueAsNumber / 2) * scale;
    context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale, radius, 0, 2 * Math.PI);
    context.fill();
    strokes += 1;
    event.preventDefault();
  }

  // The mask as a PNG data URL: white where painted, black elsewhere, at the image's size.
  function maskUrl() {
    const out = document.createElement("canvas");
    out.width = mask.width;
    out.height = mask.height;
    const context = out.getContext("2d");
    context.fillStyle = "black";
    context.fillRect(0, 0, out.width, out.height);
    context.drawImage(mask, 0, 0);
    return out.toDataURL("image/png");
  }

  return { element, show, painted: () => strokes > 0 && !document.getElementById("painter-area").hidden, mask: maskUrl };
})();
