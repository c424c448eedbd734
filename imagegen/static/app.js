// The imagegen page: plain JS over the HTTP API (GET /api/models, POST /api/generate, /api/interpolate,
// /api/vary, /api/sketch, /api/inpaint, /api/translate, and training: /api/upload, /api/train...). Every control change re-requests the image; no page reloads.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SEED = 2 ** 53 - 1;          // what a JS number holds exactly (the API takes up to 2^63 - 1)
const SLIDERS = 4;                     // principal latent directions offered as sliders (GANs, VAEs)
let models = [];
let current = null;                    // the selected model's description
let lastBlob = null;                   // the PNG on screen, for download and inpainting
let pending = null;                    // debounce timer
let requestId = 0;                     // only the newest answer is shown

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function explain(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  } catch (e) {
    return `${response.status}: ${response.statusText}`;
  }
}

// Build a request (throwing on an invalid control), send it, and show the PNG answer in image `imgId`;
// any error goes to the error box instead.
async function showAnswer(imgId, url, build, isForm) {
  try {
    const blob = await (await post(url, build(), isForm)).blob();
    $(imgId).src = URL.createObjectURL(blob);
    $(imgId).hidden = false;
    clearError();
  } catch (e) { showError(e.message); }
}

async function post(url, body, isForm) {
  const response = await fetch(url, isForm ? { method: "POST", body } : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await explain(response));
  return response;
}

function seedValue() {
  // Whole numbers go to the server, which checks the range (and says so); anything else stops here.
  const text = $("seed").value.trim();
  if (!/^-?\d+$/.test(text) || Math.abs(Number(text)) > MAX_SEED) {
    throw new Error(`seed must be a whole number from 0 to ${MAX_SEED}, got "${text}"`);
  }
  return Number(text);
}

function request() {
  const body = { model: current.name, seed: seedValue(), n: 1 };
  if (current.classes.length) body.label = $("label").value;
  if (current.text) {
    // An empty prompt goes to the server too, which says why it is refused.
    body.prompt = $("prompt").value;
    const negative = $("negative-prompt").value.trim();
    if (negative) body.negative_prompt = negative;
  }
  for (const [name, o] of Object.entries(current.options)) {
    const el = $(`opt-${name}`);
    if (el) body[name] = o.choices ? el.value : parseFloat(el.value);   // "20" -> 20, an integer field takes it
  }
  const moves = [];
  for (let i = 0; i < Math.min(SLIDERS, current.latent_dims); i++) moves.push(parseFloat($(`z-${i}`).value));
  if (moves.some((v) => v !== 0)) body.directions = moves;
  return body;
}

async function generateNow() {
  if (!current || current.translates) return;
  const id = ++requestId;
  try {
    const body = request();
    const response = await post("/api/generate", body);
    const blob = await response.blob();
    if (id !== requestId) return;
    lastBlob = blob;
    const url = URL.createObjectURL(blob);
    $("image").src = url;
    $("download").href = url;
    $("command").textContent = response.headers.get("X-Imagegen-Command") || "";
    clearError();
    drawPaintBackground();
    saveState(body);
    drawStrips(body);
  } catch (e) {
    if (id === requestId) showError(e.message);
  }
}

// --- direction sliders: their share of the variance, and a strip of the seed along each ---------------
let stripSeed = null;                  // the seed (and class) the strips show

async function labelDirections(name) {
  try {
    const info = await (await post("/api/directions", { model: name, k: Math.min(SLIDERS, current.latent_dims) })).json();
    if (!current || current.name !== name) return;
    info.explained.forEach((share, i) => {
      const label = $(`z-${i}`) && $(`z-${i}`).parentElement.firstChild;
      if (label) label.textContent = `direction ${i} (${(100 * share).toFixed(1)}%)`;
    });
  } catch (e) { showError(e.message); }
}

async function drawStrips(body) {
  const key = `${body.model}|${body.seed}|${body.label || ""}`;
  if (key === stripSeed || !current.latent_dims) return;
  stripSeed = key;
  for (let i = 0; i < Math.min(SLIDERS, current.latent_dims); i++) {
    const req = { model: body.model, index: i, seed: body.seed, frames: 5 };
    if (body.label !== undefined) req.label = body.label;
    try {
      const blob = await (await post("/api/direction-strip", req)).blob();
      if (stripSeed === key && $(`strip-${i}`)) $(`strip-${i}`).src = URL.createObjectURL(blob);
    } catch (e) { showError(e.message); return; }
  }
}

function scheduleGenerate() {
  clearTimeout(pending);
  pending = setTimeout(generateNow, 120);
}

function slider(id, label, range, onInput) {
  const wrap = document.createElement("label");
  const input = Object.assign(document.createElement("input"), { type: "range", id, ...range });
  input.setAttribute("aria-label", label);
  const out = document.createElement("output");
  out.textContent = range.value;
  input.addEventListener("input", () => { out.textContent = input.value; onInput(); });
  wrap.append(label, input, out);
  return wrap;
}

function menu(id, label, choices, onChange) {
  const wrap = document.createElement("label");
  const select = Object.assign(document.createElement("select"), { id });
  select.append(...choices.map((c) => new Option(c, c)));
  select.setAttribute("aria-label", label);
  select.addEventListener("change", onChange);
  wrap.append(label, select);
  return wrap;
}

function selectModel(name) {
  current = models.find((m) => m.name === name);
  $("model-info").textContent = `${current.family}, step ${current.step}, ${current.image_size}px` +
    (current.data ? `, ${current.data}` : "");
  const classRow = $("class-row");
  classRow.hidden = current.classes.length === 0;
  $("prompt-row").hidden = !current.text;
  $("label").replaceChildren(...current.classes.map((c) => new Option(c, c)));
  const options = $("options");
  options.replaceChildren();
  // The family's sampling options, each a slider or a menu as GET /api/models describes it (its family's
  // file declares them: imagegen/models/*.py sample_options).
  for (const [name, o] of Object.entries(current.options)) {
    options.append(o.choices ? menu(`opt-${name}`, name, o.choices, scheduleGenerate)
                             : slider(`opt-${name}`, name, { min: o.min, max: o.max, step: o.step, value: o.value },
                                      scheduleGenerate));
  }
  const sliders = $("sliders");
  sliders.replaceChildren();
  // Sliders along the model's principal latent directions (GANSpace), each with a strip of what it does.
  for (let i = 0; i < Math.min(SLIDERS, current.latent_dims); i++) {
    const row = slider(`z-${i}`, `direction ${i}`, { min: -3, max: 3, step: 0.1, value: 0 }, scheduleGenerate);
    const strip = Object.assign(document.createElement("img"), { id: `strip-${i}`, className: "direction-strip",
                                                                   alt: `what direction ${i} does` });
    sliders.append(row, strip);
  }
  stripSeed = null;
  if (current.latent_dims) labelDirections(current.name);
  $("generate-panel").hidden = current.translates;
  $("interpolate-panel").hidden = current.translates || current.latent_dims === 0;
  $("inpaint-panel").hidden = !current.inpaints;
  $("vary-panel").hidden = !current.varies;
  $("explore-panel").hidden = current.translates;
  $("sketch-panel").hidden = !current.varies || !(current.inpaints);   // a file to start from: ddpm, flow, vae
  $("explore-grid").replaceChildren();
  newSketch();
  $("translate-panel").hidden = !current.translates;
  if (current.translates) {
    const [a, b] = current.domains;
    $("direction").replaceChildren(new Option(`${a} to ${b}`, "a2b"), new Option(`${b} to ${a}`, "b2a"));
  }
  clearError();
  scheduleGenerate();
}

// --- the page's state in the URL: a link to it shows the same image ----------------------------------
// The hash holds the /api/generate body of the image on screen (model, seed, class, prompt, options,
// latent); opening the link restores each control from it, then draws that image.
function saveState(body) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(body)) {
    if (k !== "n") params.set(k, Array.isArray(v) ? v.join(",") : String(v));
  }
  history.replaceState(null, "", `#${params}`);
}

function restoreState() {
  const params = new URLSearchParams(location.hash.slice(1));
  const name = params.get("model");
  if (!name || !models.some((m) => m.name === name)) return false;
  $("model").value = name;
  selectModel(name);
  const set = (id, key) => { if (params.has(key) && $(id)) $(id).value = params.get(key); };
  set("seed", "seed");
  set("label", "label");
  set("prompt", "prompt");
  set("negative-prompt", "negative_prompt");
  for (const option of Object.keys(current.options)) set(`opt-${option}`, option);
  const moves = (params.get("directions") || "").split(",").filter((v) => v !== "");
  moves.forEach((v, i) => { if ($(`z-${i}`)) $(`z-${i}`).value = v; });
  for (const el of document.querySelectorAll("#options input, #sliders input")) {
    el.nextElementSibling.textContent = el.value;        // each slider's number shows its restored value
  }
  scheduleGenerate();
  return true;
}

// --- the board: kept images and their commands, in local storage; downloaded as a zip ----------------
const BOARD_KEY = "imagegen-board";

function boardItems() {
  try { return JSON.parse(localStorage.getItem(BOARD_KEY) || "[]"); } catch (e) { return []; }
}

function blobToDataURL(blob) {
  return new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(blob); });
}

async function keepNow() {
  if (!lastBlob) return showError("generate an image first");
  const items = boardItems();
  const body = request();
  items.push({ name: `${String(items.length + 1).padStart(2, "0")}-seed${body.seed}.png`,
               png: await blobToDataURL(lastBlob), command: $("command").textContent });
  try { localStorage.setItem(BOARD_KEY, JSON.stringify(items)); } catch (e) { return showError(`cannot keep: ${e.message}`); }
  showBoard();
}

function showBoard() {
  $("board").replaceChildren(...boardItems().map((it) => {
    const img = Object.assign(document.createElement("img"), { src: it.png, title: it.command, alt: it.name, className: "kept" });
    img.dataset.command = it.command;
    return img;
  }));
}

const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xFFFFFFFF;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xFF] ^ (c >>> 8);
  return (c ^ 0xFFFFFFFF) >>> 0;
}

// A zip of files [{name, bytes}], stored without compression (PNGs are compressed already): local
// headers, then the central directory, then its end record (PKWARE APPNOTE 4.3), little-endian.
function zipBlob(files) {
  const enc = new TextEncoder();
  const parts = [], central = [];
  let offset = 0;
  for (const f of files) {
    const name = enc.encode(f.name), crc = crc32(f.bytes), size = f.bytes.length;
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);            // local file header
    local.setUint16(4, 20, true);                    // version needed: 2.0
    local.setUint16(12, 0x21, true);                 // date: 1980-01-01
    local.setUint32(14, crc, true);
    local.setUint32(18, size, true);                 // compressed size = size (stored)
    local.setUint32(22, size, true);
    local.setUint16(26, name.length, true);
    parts.push(local, name, f.bytes);
    const entry = new DataView(new ArrayBuffer(46));
    entry.setUint32(0, 0x02014b50, true);            // central directory header
    entry.setUint16(4, 20, true);
    entry.setUint16(6, 20, true);
    entry.setUint16(14, 0x21, true);
    entry.setUint32(16, crc, true);
    entry.setUint32(20, size, true);
    entry.setUint32(24, size, true);
    entry.setUint16(28, name.length, true);
    entry.setUint32(42, offset, true);               // where its local header starts
    central.push(entry, name);
    offset += 30 + name.length + size;
  }
  const size = central.reduce((n, p) => n + p.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, files.length, true);
  end.setUint16(10, files.length, true);
  end.setUint32(12, size, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}

function downloadBoard() {
  const items = boardItems();
  if (!items.length) return showError("the board is empty: keep an image first");
  const files = items.map((it) => ({ name: it.name,
    bytes: Uint8Array.from(atob(it.png.split(",")[1]), (ch) => ch.charCodeAt(0)) }));
  const lines = items.map((it) => `${it.name}: ${it.command}`).join("\n") + "\n";
  files.push({ name: "commands.txt", bytes: new TextEncoder().encode(lines) });
  const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(zipBlob(files)), download: "imagegen-board.zip" });
  document.body.append(link);
  link.click();
  link.remove();
}

// --- training from the browser: upload a zip, train, follow the job's events, then explore the run ----
// The token: opening the address `imagegen serve` printed (?token=...) gave this page a cookie that
// carries it (the server then cleaned the address); one typed in the field is sent as a header.
function tokenHeader() {
  return $("token").value ? { "X-Imagegen-Token": $("token").value } : {};
}

function postWithToken(url, init) {
  return fetch(url, { method: "POST", ...init, headers: { ...(init.headers || {}), ...tokenHeader() } });
}

async function sendWithToken(url, init) {
  const response = await postWithToken(url, init);
  if (!response.ok) throw new Error(await explain(response));
  return response.json();
}

let gridStep = null;                   // the step of the sample grid on screen

function showTraining(job) {
  if (job.grid_step !== null && job.grid_step !== undefined && job.grid_step !== gridStep) {
    gridStep = job.grid_step;
    $("train-grid").src = `/api/train/grid?step=${gridStep}`;   // a new URL per grid: no stale cache
    $("train-grid").hidden = false;
  }
  const what = job.stage === "autoencoder" ? "the autoencoder" : job.stage === "model" ? `${job.family} on latents` : job.family;
  const text = job.state === "running" ? `training ${what}: step ${job.step}, ${job.seconds} s of ${job.minutes * 60} s`
    : job.state === "failed" ? `failed: ${job.error}` : `${job.state}${job.run ? `: ${job.run}` : ""}`;
  $("train-status").textContent = text;
}

let lastUpload = null;                  // {key, upload}: the zip this page sent last, not sent again

async function trainNow() {
  try {
    const file = $("train-zip").files[0];
    if (!file) throw new Error("choose a zip of images to train on");
    const key = `${file.name}/${file.size}/${file.lastModified}`;
    const train = (upload) => postWithToken("/api/train", {
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ upload, family: $("train-family").value, minutes: parseFloat($("train-minutes").value),
                             latent: $("train-latent").checked && !$("train-latent").disabled }),
    });
    // The same file again: train on the upload the server holds (unless it has dropped it: 404).
    let response = lastUpload && lastUpload.key === key ? await train(lastUpload.upload) : null;
    if (!response || response.status === 404) {
      const form = new FormData();
      form.append("archive", file, file.name);
      $("train-status").textContent = "uploading...";
      const up = await sendWithToken("/api/upload", { body: form });
      lastUpload = { key, upload: up.upload };
      response = await train(up.upload);
    }
    if (!response.ok) throw new Error(await explain(response));
    const job = await response.json();
    showTraining(job);
    clearError();
    const events = new EventSource("/api/train/events");
    events.onmessage = async (message) => {
      const now = JSON.parse(message.data);
      showTraining(now);
      if (now.state === "running") return;
      events.close();
      if (now.state === "failed") showError(`training failed: ${now.error}`);
      if (now.state === "done" && now.model) await exploreNewRun(now.model);
    };
  } catch (e) { showError(e.message); }
}

async function exploreNewRun(name) {
  models = await (await fetch("/api/models")).json();
  $("model").replaceChildren(...models.map((m) => new Option(`${m.name} (${m.family})`, m.name)));
  $("model").value = name;
  wireModelControls();
  newMask();
  selectModel(name);
  $("explore-seed").value = "0";
  await exploreNow(false);
}

async function cancelTraining() {
  try { showTraining(await sendWithToken("/api/train/cancel", {})); } catch (e) { showError(e.message); }
}

// --- interpolation ---------------------------------------------------------------------------------
function interpolateNow() {
  return showAnswer("strip", "/api/interpolate", () => {
    const body = { model: current.name, seed_a: seedValue(), seed_b: Number($("seed-b").value),
                   frames: Number($("frames").value) };
    if (current.classes.length) body.label = $("label").value;
    return body;
  });
}

// --- variations and breeding: the image above is the source (its seed, class, prompt and options) -----
const VARIATIONS = 8;

async function varyNow() {
  try {
    const body = request();                 // the source's model, class, prompt and sampling options
    delete body.directions;                 // the source is the seed's own image
    body.source = body.seed;
    body.seed = Number($("vary-seed").value);
    body.n = VARIATIONS;
    body.strength = parseFloat($("strength").value);
    const parent = $("parent").value.trim();
    if (parent !== "") {
      body.parent = Number(parent);
      body.mix = parseFloat($("mix").value);
    }
    const response = await post("/api/vary", body);
    const blob = await response.blob();
    $("variations").src = URL.createObjectURL(blob);
    $("variations").hidden = false;
    $("vary-command").textContent = response.headers.get("X-Imagegen-Command") || "";
    clearError();
  } catch (e) { showError(e.message); }
}

// --- explore: 16 candidates, each its own /api/generate request (the server batches them) ------------
const CANDIDATES = 16;

async function exploreNow(fresh) {
  try {
    if (fresh) $("explore-seed").value = String(Math.floor(Math.random() * 1e9));
    const base = Number($("explore-seed").value);
    const body = request();
    const cells = Array.from({ length: CANDIDATES }, (_, i) => {
      const img = Object.assign(document.createElement("img"), { className: "candidate", alt: `seed ${base + i}` });
      img.dataset.seed = String(base + i);
      img.addEventListener("click", () => { $("seed").value = img.dataset.seed; scheduleGenerate(); });
      return img;
    });
    $("explore-grid").replaceChildren(...cells);
    await Promise.all(cells.map(async (img) => {
      const response = await post("/api/generate", { ...body, seed: Number(img.dataset.seed), n: 1 });
      img.src = URL.createObjectURL(await response.blob());
      img.title = img.dataset.command = response.headers.get("X-Imagegen-Command") || "";
    }));
    clearError();
  } catch (e) { showError(e.message); }
}

// --- sketch: a colour brush on a canvas at the model's resolution, turned into images by /api/sketch ----
const sketchView = $("sketch");
let sketch = null;                      // a canvas at the model's resolution
let sketching = false;

function newSketch() {
  sketch = blackCanvas();
  drawSketch();
}

function drawSketch() {
  const g = sketchView.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(sketch, 0, 0, sketchView.width, sketchView.height);
}

function sketchAt(event) {
  if (!sketching || !sketch) return;
  const [x, y] = canvasPoint(sketchView, sketch, event);
  const r = Math.max(1, Number($("brush-size").value) || 1);
  const g = sketch.getContext("2d");
  g.fillStyle = $("brush-colour").value;
  g.fillRect(x - Math.floor(r / 2), y - Math.floor(r / 2), r, r);
  drawSketch();
}

sketchView.addEventListener("mousedown", (e) => { sketching = true; sketchAt(e); });
sketchView.addEventListener("mousemove", sketchAt);
window.addEventListener("mouseup", () => { sketching = false; });

async function sketchNow() {
  try {
    const body = request();
    delete body.directions;
    body.n = VARIATIONS;
    body.strength = parseFloat($("sketch-strength").value);
    const png = await new Promise((resolve) => sketch.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("request", JSON.stringify(body));
    form.append("image", png, "sketch.png");
    const response = await post("/api/sketch", form, true);
    $("sketched").src = URL.createObjectURL(await response.blob());
    $("sketched").hidden = false;
    $("sketch-download").href = URL.createObjectURL(png);     // the exact bytes the command reads
    $("sketch-download").hidden = false;
    $("sketch-command").textContent = response.headers.get("X-Imagegen-Command") || "";
    clearError();
  } catch (e) { showError(e.message); }
}

// --- inpainting: paint a mask over the current image ---------------------------------------------------
const paint = $("paint");
const ctx = paint.getContext("2d");
let mask = null;                        // a canvas at the model's resolution: white = regenerate
let painting = false;

// A canvas at the model's resolution, all black: the mask's and the sketch's.
function blackCanvas() {
  const size = current ? current.image_size : 28;
  const canvas = Object.assign(document.createElement("canvas"), { width: size, height: size });
  const g = canvas.getContext("2d");
  g.fillStyle = "black";
  g.fillRect(0, 0, size, size);
  return canvas;
}

// The pixel of `target` (at the model's resolution) under the pointer on `view` (its enlarged display).
function canvasPoint(view, target, event) {
  const rect = view.getBoundingClientRect();
  return [Math.floor((event.clientX - rect.left) / rect.width * target.width),
          Math.floor((event.clientY - rect.top) / rect.height * target.height)];
}

function newMask() {
  mask = blackCanvas();
}

function drawPaintBackground() {
  if (!lastBlob) return;
  if (!mask || mask.width !== current.image_size) newMask();
  const img = new Image();
  img.onload = () => {
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, paint.width, paint.height);
    ctx.globalAlpha = 0.5;
    ctx.drawImage(mask, 0, 0, paint.width, paint.height);
    ctx.globalAlpha = 1;
  };
  img.src = URL.createObjectURL(lastBlob);
}

function brush(event) {
  if (!painting || !mask) return;
  const [x, y] = canvasPoint(paint, mask, event);
  const m = mask.getContext("2d");
  m.fillStyle = "white";
  m.fillRect(x - 1, y - 1, 3, 3);
  drawPaintBackground();
}

paint.addEventListener("mousedown", (e) => { painting = true; brush(e); });
paint.addEventListener("mousemove", brush);
window.addEventListener("mouseup", () => { painting = false; });

async function inpaintNow() {
  if (!lastBlob) return showError("generate an image first");
  const maskBlob = await new Promise((resolve) => mask.toBlob(resolve, "image/png"));
  return showAnswer("inpainted", "/api/inpaint", () => {
    const form = new FormData();
    form.append("model", current.name);
    form.append("seed", String(seedValue()));
    if (current.classes.length) form.append("label", $("label").value);
    form.append("image", lastBlob, "image.png");
    form.append("mask", maskBlob, "mask.png");
    return form;
  }, true);
}

// --- translation ---------------------------------------------------------------------------------------
function translateNow() {
  return showAnswer("translated", "/api/translate", () => {
    const file = $("upload").files[0];
    if (!file) throw new Error("choose an image to translate");
    const form = new FormData();
    form.append("model", current.name);
    form.append("direction", $("direction").value);
    form.append("image", file, file.name);
    return form;
  }, true);
}

async function start() {
  // Training and the board work without any model: a first run can be trained from this page.
  $("train-go").addEventListener("click", trainNow);
  $("train-cancel").addEventListener("click", cancelTraining);
  $("board-download").addEventListener("click", downloadBoard);
  $("board-clear").addEventListener("click", () => { localStorage.removeItem(BOARD_KEY); showBoard(); });
  showBoard();
  // "on latents" is offered for the families that learn an autoencoder's latents (flow, ddpm).
  Promise.all(["/api/train/families", "/api/train/latent-families"].map((u) => fetch(u).then((r) => r.json())))
    .then(([names, latent]) => {
      $("train-family").replaceChildren(...names.map((n) => new Option(n, n)));
      const offer = () => { $("train-latent").disabled = !latent.includes($("train-family").value); };
      $("train-family").addEventListener("change", offer);
      offer();
    }).catch((e) => showError(`cannot list the families to train: ${e.message}`));
  $("model").addEventListener("change", () => { newMask(); selectModel($("model").value); });
  try {
    const response = await fetch("/api/models");
    if (!response.ok) throw new Error(await explain(response));
    models = await response.json();
  } catch (e) {
    showError(`cannot list the models: ${e.message}`);
    return;
  }
  if (!models.length) {
    for (const panel of document.querySelectorAll("main > section")) {
      panel.hidden = !["train-panel", "board-panel"].includes(panel.id);
    }
    showError("no trained runs in the served folder yet: train one below, or with `imagegen train`");
    return;
  }
  $("model").replaceChildren(...models.map((m) => new Option(`${m.name} (${m.family})`, m.name)));
  wireModelControls();
  if (!restoreState()) selectModel(models[0].name);
  newMask();
}

let wired = false;                      // the model controls' listeners are attached once there is a model

function wireModelControls() {
  if (wired) return;
  wired = true;
  for (const id of ["seed", "label", "prompt", "negative-prompt"]) $(id).addEventListener("input", scheduleGenerate);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 1e9));
    scheduleGenerate();
  });
  $("interpolate").addEventListener("click", interpolateNow);
  $("vary").addEventListener("click", varyNow);
  $("keep").addEventListener("click", keepNow);
  $("explore").addEventListener("click", () => exploreNow(false));
  $("explore-new").addEventListener("click", () => exploreNow(true));
  $("clear-sketch").addEventListener("click", newSketch);
  $("sketch-go").addEventListener("click", sketchNow);
  for (const id of ["strength", "mix", "sketch-strength"]) {
    $(id).addEventListener("input", () => { $(`${id}-out`).textContent = $(id).value; });
  }
  $("clear-mask").addEventListener("click", () => { newMask(); drawPaintBackground(); });
  $("inpaint").addEventListener("click", inpaintNow);
  $("translate").addEventListener("click", translateNow);
}

start();
