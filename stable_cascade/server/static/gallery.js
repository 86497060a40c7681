// The gallery: past jobs a page of 24 at a time (newest first, "Older" and "Newer" page through them),
// each with its images (a click opens the lightbox), its parameters and what can be done with it:
// reuse its parameters, send an image to img2img, download, cancel or delete; and all the page's images
// as one zip.
"use strict";

const PAGE = 24;
const Gallery = (() => {
  let before = null; // the seq the shown page starts below (null: the newest)
  const earlier = []; // the pages before, for "Newer"
  let shown = []; // the jobs on the page
  let images = []; // [{url, caption}] of the page, in order, for the lightbox
  let lightboxAt = -1;
  const urls = new Map(); // image path → object URL (the images need the API key, so they are fetched)
  let refreshing = null;
  let again = false;
  let timer = null;

  async function imageUrl(path) {
    if (!urls.has(path)) urls.set(path, URL.createObjectURL(await (await api(path)).blob()));
    return urls.get(path);
  }

  function button(label, action, id = "") {
    const b = element("button", { type: "button", textContent: label });
    if (id) b.dataset.action = id;
    b.addEventListener("click", action);
    return b;
  }

  async function card(job) {
    const box = element("div", { className: "card" });
    box.dataset.id = job.id;
    const prompt = element("div", { className: "prompt" }, job.job.prompt || `(${job.job.task}, no prompt)`);
    const state = element("div", { className: "meta state-" + job.state }, job.state + (job.error ? ": " + job.error : ""));
    const pictures = element("div", { className: "images" });
    const actions = element("div", { className: "actions" });
    actions.append(button("Reuse parameters", () => reuse(job.job, job), "reuse"));
    if (job.state === "queued" || job.state === "running") actions.append(button("Cancel", () => cancel(job.id), "cancel"));
    else actions.append(button("Delete", () => remove(job.id), "delete"));
    for (const image of job.images) {
      const src = await imageUrl(image.url);
      const at = images.length;
      images.push({ url: src, caption: image.infotext });
      const img = element("img", { alt: `seed ${image.seed}`, title: image.infotext, src });
      img.addEventListener("click", () => openLightbox(at));
      pictures.append(img);
      actions.append(button(`Send ${image.seed} to img2img`, () => sendToImg2img(job, src, image), "img2img"));
      actions.append(element("a", { href: src, download: `${job.id.slice(0, 8)}-${image.seed}.png` }, `Download ${image.seed}`));
    }
    const meta = element("div", { className: "meta" }, job.images.length ? job.images[0].infotext.split("\n").slice(1).join("\n") : "");
    box.append(prompt, state, pictures, meta, actions);
    return box;
  }

  // The page again (at most one refresh at a time; one more after it when asked meanwhile).
  async function refresh() {
    if (refreshing) { again = true; return refreshing; }
    refreshing = (async () => {
      try {
        const query = `/v1/jobs?limit=${PAGE}` + (before === null ? "" : `&before=${before}`);
        const { jobs } = await (await api(query)).json();
        images = [];
        const cards = [];
        for (const job of jobs) cards.push(await card(job));
        byId("gallery").replaceChildren(...cards);
        shown = jobs;
        const kept = new Set(jobs.flatMap((job) => job.images.map((image) => image.url)));
        for (const [path, url] of urls) if (!kept.has(path)) { URL.revokeObjectURL(url); urls.delete(path); }
        byId("older").disabled = jobs.length < PAGE;
        byId("newer").disabled = earlier.length === 0;
        byId("zip").disabled = !jobs.some((job) => job.images.length);
      } catch (error) { showError(error); }
    })();
    await refreshing;
    refreshing = null;
    if (again) { again = false; await refresh(); }
  }

  function soon() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 250);
  }

  function older() {
    if (!shown.length) return;
    earlier.push(before);
    before = shown[shown.length - 1].seq;
    refresh();
  }

  function newer() {
    if (!earlier.length) return;
    before = earlier.pop();
    refresh();
  }

  async function remove(id) {
    try { await api(`/v1/gallery/${id}`, { method: "DELETE" }); } catch (error) { showError(error); }
    refresh();
  }

  async function zip() {
    const ids = shown.filter((job) => job.images.length).map((job) => job.id).join(",");
    try {
      const blob = await (await api(`/v1/images.zip?ids=${ids}`)).blob();
      const link = element("a", { href: URL.createObjectURL(blob), download: "stable-cascade-images.zip" });
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    } catch (error) { showError(error); }
  }

  // "Send to img2img": the image as the input image, the job's settings in the form.
  async function sendToImg2img(job, src, image) {
    const blob = await (await fetch(src)).blob();
    const transfer = new DataTransfer();
    transfer.items.add(new File([blob], `${job.id.slice(0, 8)}-${image.seed}.png`, { type: "image/png" }));
    reuse({ ...job.job, task: "img2img", seed: image.seed }, job);
    byId("task").value = "img2img";
    byId("input_image").files = transfer.files;
    applyTask();
  }

  function openLightbox(at) {
    if (!images.length) return;
    lightboxAt = (at + images.length) % images.length;
    byId("lightbox-image").src = images[lightboxAt].url;
    byId("lightbox-caption").textContent = images[lightboxAt].caption;
    byId("lightbox").hidden = false;
  }

  function closeLightbox() { byId("lightbox").hidden = true; lightboxAt = -1; }

  function start() {
    byId("older").addEventListener("click", older);
    byId("newer").addEventListener("click", newer);
    byId("zip").addEventListener("click", zip);
    byId("lightbox-close").addEventListener("click", closeLightbox);
    byId("lightbox-previous").addEventListener("click", () => openLightbox(lightboxAt - 1));
    byId("lightbox-next").addEventListener("click", () => openLightbox(lightboxAt + 1));
    byId("lightbox").addEventListener("click", (event) => { if (event.target === byId("lightbox")) closeLightbox(); });
    document.addEventListener("keydown", (event) => {
      if (byId("lightbox").hidden) return;
      if (event.key === "Escape") closeLightbox();
      else if (event.key === "ArrowLeft") openLightbox(lightboxAt - 1);
      else if (event.key === "ArrowRight") openLightbox(lightboxAt + 1);
    });
  }

  return { refresh, soon, start };
})();
