// DAAM preview on the 'DAAM Heatmaps' node: the generated image with per-word overlays (word chips), the words
// that attend most under the cursor, a threshold slider that previews the MASK, a write-back of words and
// threshold into the node's widgets, a batch picker and, for models traced with time buckets, a time scrub.
// The payload (nodes/preview.py) arrives once per run in the node's `ui.daam_preview`.

// The frontend serves its modules under <root>/scripts/ and extensions under <root>/extensions/<pack>/...;
// resolve from this file's URL so neither the folder depth nor a proxy prefix matters.
const ROOT = import.meta.url.slice(0, import.meta.url.lastIndexOf("/extensions/") + 1);
const { app } = await import(ROOT + "scripts/app.js");
const { api } = await import(ROOT + "scripts/api.js");

const NODE = "DAAMHeatmaps";
const PALETTE = ["#ff3b30", "#2f7bff", "#34c759", "#ffcc00", "#af52de", "#ff9500", "#00c7be", "#ff2d55",
  "#a2845e", "#5ac8fa"];
const MIN_HEIGHT = 400;
const PROMPT_TEXTS = ["positive", "negative"];  // multiline text widgets, usually linked from a string node
const ROW = 20;  // LiteGraph's NODE_WIDGET_HEIGHT

function hexRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function bytesOf(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

async function inflate(b64) {
  const stream = new Blob([bytesOf(b64)]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// Bilinear resize of one [h, w] map to [H, W] (half-pixel centres), for display and hover only.
function resize(src, h, w, H, W) {
  if (h === H && w === W) return Float32Array.from(src);
  const out = new Float32Array(H * W);
  for (let y = 0; y < H; y++) {
    const fy = Math.min(Math.max((y + 0.5) * h / H - 0.5, 0), h - 1);
    const y0 = Math.floor(fy), y1 = Math.min(y0 + 1, h - 1), ty = fy - y0;
    for (let x = 0; x < W; x++) {
      const fx = Math.min(Math.max((x + 0.5) * w / W - 0.5, 0), w - 1);
      const x0 = Math.floor(fx), x1 = Math.min(x0 + 1, w - 1), tx = fx - x0;
      const a = src[y0 * w + x0] * (1 - tx) + src[y0 * w + x1] * tx;
      const b = src[y1 * w + x0] * (1 - tx) + src[y1 * w + x1] * tx;
      out[y * W + x] = a * (1 - ty) + b * ty;
    }
  }
  return out;
}

function el(tag, props = {}, children = []) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.append(c);
  return e;
}

const STYLE = `
.daam-preview { display:flex; flex-direction:column; gap:4px; width:100%; height:100%; min-height:${MIN_HEIGHT}px;
  box-sizing:border-box;
  padding:2px; font:12px sans-serif; color:#ddd; overflow:hidden; }
.daam-preview .daam-chips { display:flex; flex-wrap:wrap; gap:3px; max-height:72px; overflow:auto; flex:none; }
.daam-preview .daam-chip { padding:1px 7px; border-radius:9px; border:1px solid #666; background:#2a2a2a;
  color:#bbb; cursor:pointer; font:inherit; }
.daam-preview .daam-chip.daam-neg { border-style:dashed; }
.daam-preview .daam-chip.daam-on { color:#000; font-weight:bold; border-color:#fff; }
.daam-preview .daam-area { flex:1 1 auto; min-height:60px; display:flex; align-items:center; justify-content:center;
  overflow:hidden; }
.daam-preview .daam-stage { position:relative; flex:none; }
.daam-preview canvas.daam-canvas { width:100%; height:100%; display:block; cursor:crosshair; }
.daam-preview .daam-label { position:absolute; transform:translate(-50%,-50%); padding:0 3px; border-radius:3px;
  background:rgba(0,0,0,.65); font-weight:bold; pointer-events:none; white-space:nowrap; }
.daam-preview .daam-row { display:flex; align-items:center; gap:6px; flex:none; }
.daam-preview .daam-row input[type=range] { flex:1; min-width:40px; }
.daam-preview .daam-hover { min-height:15px; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; flex:none; }
.daam-preview button.daam-action { font:inherit; padding:1px 6px; cursor:pointer; }
.daam-preview button.daam-image.daam-on { font-weight:bold; outline:1px solid #fff; }
`;

function ensureStyle() {
  if (document.getElementById("daam-preview-style")) return;
  document.head.append(el("style", { id: "daam-preview-style", textContent: STYLE }));
}

const MAX_IMAGE_BUTTONS = 8; // more images than this (a video's frames) get a slider instead of buttons

function describeRefine(r) {
  const parts = [];
  if (r.map_source && r.map_source !== "attention") parts.push(r.map_source);
  if (r.propagate_steps > 0) parts.push(`propagate ${r.propagate_steps}${r.propagate_at === "finest resolution" ? " (finest)" : ""}`);
  if (r.head_power > 0) parts.push(`heads ${r.head_power}`);
  if (r.exclusive) parts.push("exclusive");
  return parts.join(", ");
}

function isRefined(r) {
  return r.propagate_steps > 0 || r.head_power > 0 || !!r.exclusive || (r.map_source || "attention") !== "attention";
}

class DaamPreview {
  constructor(node) {
    ensureStyle();
    this.node = node;
    this.data = null;
    this.image = 0;
    this.bucket = 0; // 0: the whole sampling; k: time bucket k
    this.variant = 0; // 0: the node's maps; 1: the payload's other refinement setting (plain <-> refined)
    this.mode = "overlay";
    this.cache = new Map();
    this.chips = el("div", { className: "daam-chips" });
    this.canvas = el("canvas", { className: "daam-canvas", width: 1, height: 1 });
    this.labels = el("div");
    this.stage = el("div", { className: "daam-stage" }, [this.canvas, this.labels]);
    this.area = el("div", { className: "daam-area" }, [this.stage]);
    this.hover = el("div", { className: "daam-hover", textContent: "Run the workflow to see where each word acts." });
    this.threshold = el("input", { type: "range", min: 0, max: 100, step: 1, value: 40, className: "daam-threshold" });
    this.thresholdText = el("span", { className: "daam-threshold-value", textContent: "0.40" });
    this.modeButton = el("button", { className: "daam-action daam-mode", textContent: "mask" });
    this.apply = el("button", { className: "daam-action daam-apply", textContent: "use for next run",
      title: "Write the selected words and this threshold into the node's widgets: the next run's MASK is the mask shown" });
    this.refineButton = el("button", { className: "daam-action daam-refine", style: "display:none",
      title: "Switch between plain DAAM maps and the refined maps the trace allows (self-attention, head weights or output similarity), without a new run" });
    this.time = el("input", { type: "range", min: 0, max: 0, step: 1, value: 0, className: "daam-time" });
    this.timeText = el("span", { className: "daam-time-value" });
    this.timeRow = el("div", { className: "daam-row", style: "display:none" }, [el("span", { textContent: "time" }), this.time, this.timeText]);
    this.imageRow = el("div", { className: "daam-row daam-images", style: "display:none" });
    this.root = el("div", { className: "daam-preview" }, [
      this.chips, this.imageRow, this.area,
      el("div", { className: "daam-row" }, [el("span", { textContent: "threshold" }), this.threshold, this.thresholdText,
        this.modeButton, this.refineButton, this.apply]),
      this.timeRow, this.hover]);
    this.threshold.oninput = () => { this.mode = "mask"; this.draw(); };
    this.modeButton.onclick = () => { this.mode = this.mode === "mask" ? "overlay" : "mask"; this.draw(); };
    this.apply.onclick = () => this.writeBack();
    this.refineButton.onclick = () => { this.variant = 1 - this.variant; this.cache.clear(); this.draw(); };
    this.time.oninput = () => { this.bucket = Number(this.time.value); this.draw(); };
    this.canvas.onmousemove = (e) => this.onHover(e);
    this.canvas.onmouseleave = () => { this.hover.textContent = ""; };
    new ResizeObserver(() => this.fit()).observe(this.area);
  }

  // -- data ------------------------------------------------------------------------------------------------
  async load(payload) {
    const [h, w] = payload.map_hw, [H, W] = payload.image_hw, n = payload.entries.length;
    const images = [];
    const decode = async (v) => {
      const raw = bytesOf(v.maps);
      return { maps: new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), levels: await inflate(v.levels) };
    };
    for (const item of payload.images) {
      const variants = [await decode(item)];
      if (item.other) variants.push(await decode(item.other));
      const time = item.time ? await inflate(item.time) : null;
      let picture = null;
      if (item.image) picture = await this.fetchImage(item.image, W, H);
      images.push({ variants, time, picture });
    }
    this.data = { ...payload, h, w, H, W, n, decoded: images,
      selected: payload.entries.map(() => false), colour: payload.entries.map(() => null) };
    payload.entries.forEach((e, i) => { if (e.selected) this.select(i, true); });
    this.cache.clear();
    this.image = Math.min(this.image, images.length - 1);
    this.bucket = 0;
    this.variant = 0;
    this.mode = "overlay";
    this.threshold.value = String(Math.round(payload.threshold * payload.threshold_steps));
    this.threshold.max = String(payload.threshold_steps);
    this.buildControls();
    this.hover.textContent = "Hover over the image: the shown words that attend most there.";
    this.fit();
    this.draw();
  }

  async fetchImage(ref, W, H) {
    const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "temp" });
    const img = new Image();
    img.src = api.apiURL("/view?" + query.toString());
    await img.decode();
    const c = el("canvas", { width: W, height: H });
    const g = c.getContext("2d");
    g.drawImage(img, 0, 0, W, H);
    return g.getImageData(0, 0, W, H).data;
  }

  // The maps and mask levels shown: the node's, or the payload's other refinement setting.
  shownVariant(img) {
    return img.variants[Math.min(this.variant, img.variants.length - 1)];
  }

  // The refinement setting shown, as the node's widgets take it.
  shownRefine() {
    const r = this.data.refine;
    return r && this.variant && r.other ? r.other : (r ? r.node : { propagate_steps: 0, head_power: 0, map_source: "attention" });
  }

  // Entry `i`'s map of the current image and time bucket at map size, unnormalised (comparable across words).
  rawOf(i) {
    const d = this.data, img = d.decoded[this.image], size = d.h * d.w;
    if (this.bucket > 0 && img.time) {
      const off = ((this.bucket - 1) * d.n + i) * size;
      return Float32Array.from(img.time.subarray(off, off + size), (v) => v / 255);
    }
    return this.shownVariant(img).maps.subarray(i * size, (i + 1) * size);
  }

  // Entry `i`'s overlay at image size, normalised as the node normalises ('none' is shown like 'shared').
  mapOf(i) {
    const d = this.data, key = `${this.image}:${this.bucket}:${this.variant}:${i}`;
    let m = this.cache.get(key);
    if (!m) {
      const raw = this.rawOf(i), low = new Float32Array(raw.length);
      let lo = Infinity, hi = 0;
      for (const v of raw) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      if (d.normalize === "shared" || d.normalize === "none") {
        lo = 0;
        hi = 0;
        d.entries.forEach((e, j) => { if (e.prompt === d.entries[i].prompt) for (const v of this.rawOf(j)) hi = Math.max(hi, v); });
      } else if (d.normalize === "max") {
        lo = 0;
      }
      for (let p = 0; p < raw.length; p++) low[p] = hi > lo ? (raw[p] - lo) / (hi - lo) : 0;
      m = resize(low, d.h, d.w, d.H, d.W);
      this.cache.set(key, m);
    }
    return m;
  }

  // Entry `i`'s unnormalised value at image pixel (x, y), sampled bilinearly from the map.
  valueAt(i, x, y) {
    const d = this.data, raw = this.rawOf(i);
    const fy = Math.min(Math.max((y + 0.5) * d.h / d.H - 0.5, 0), d.h - 1), fx = Math.min(Math.max((x + 0.5) * d.w / d.W - 0.5, 0), d.w - 1);
    const y0 = Math.floor(fy), x0 = Math.floor(fx), y1 = Math.min(y0 + 1, d.h - 1), x1 = Math.min(x0 + 1, d.w - 1);
    const ty = fy - y0, tx = fx - x0;
    return (raw[y0 * d.w + x0] * (1 - tx) + raw[y0 * d.w + x1] * tx) * (1 - ty)
      + (raw[y1 * d.w + x0] * (1 - tx) + raw[y1 * d.w + x1] * tx) * ty;
  }

  // -- controls ------------------------------------------------------------------------------------------
  buildControls() {
    const d = this.data;
    this.chips.replaceChildren(...d.entries.map((e, i) => {
      const chip = el("button", { className: "daam-chip" + (e.prompt === "negative" ? " daam-neg" : ""),
        textContent: (e.prompt === "negative" ? "neg: " : "") + e.key,
        title: `${e.prompt} prompt, ${e.kind}: click to show or hide its overlay` });
      chip.dataset.key = e.key;
      chip.dataset.prompt = e.prompt;
      chip.onclick = () => { this.select(i, !d.selected[i]); this.styleChips(); this.draw(); };
      return chip;
    }));
    this.styleChips();
    this.refineButton.style.display = d.refine && d.refine.other ? "" : "none";
    const k = d.time ? d.time.buckets : 0;
    this.timeRow.style.display = k ? "" : "none";
    this.time.max = String(k);
    this.time.value = "0";
    const count = d.decoded.length;
    this.imageRow.style.display = count > 1 ? "" : "none";
    if (count > MAX_IMAGE_BUTTONS) {
      // many images (a video's frames): a slider steps through them
      const slider = el("input", { type: "range", min: 1, max: count, step: 1, value: this.image + 1, className: "daam-frame" });
      const text = el("span", { className: "daam-frame-value" });
      slider.oninput = () => { this.image = Number(slider.value) - 1; this.styleImages(); this.draw(); };
      this.imageRow.replaceChildren(el("span", { textContent: "image" }), slider, text);
    } else {
      this.imageRow.replaceChildren(el("span", { textContent: "image" }), ...d.decoded.map((_, b) => {
        const btn = el("button", { className: "daam-action daam-image", textContent: String(b + 1) });
        btn.onclick = () => { this.image = b; this.styleImages(); this.draw(); };
        return btn;
      }));
    }
    this.styleImages();
  }

  // A selected word keeps its colour; a newly selected one takes the first colour no selected word uses.
  select(i, on) {
    const d = this.data;
    d.selected[i] = on;
    if (on && !d.colour[i]) {
      const used = new Set(d.colour.filter((c, j) => c && d.selected[j] && j !== i));
      d.colour[i] = PALETTE.find((c) => !used.has(c)) || PALETTE[i % PALETTE.length];
    } else if (!on) {
      d.colour[i] = null;
    }
  }

  styleChips() {
    const d = this.data;
    [...this.chips.children].forEach((chip, i) => {
      chip.classList.toggle("daam-on", d.selected[i]);
      chip.setAttribute("aria-pressed", String(d.selected[i]));
      chip.style.background = d.selected[i] ? d.colour[i] : "";
    });
  }

  styleImages() {
    [...this.imageRow.querySelectorAll("button")].forEach((b, i) => b.classList.toggle("daam-on", i === this.image));
    const frame = this.imageRow.querySelector(".daam-frame-value");
    if (frame) frame.textContent = `${this.image + 1} / ${this.data.decoded.length}`;
  }

  // Keep the stage at the image's aspect ratio inside whatever room the node gives.
  fit() {
    if (!this.data) return;
    const { H, W } = this.data, aw = this.area.clientWidth, ah = this.area.clientHeight;
    if (!aw || !ah) return;
    const s = Math.min(aw / W, ah / H);
    this.stage.style.width = `${Math.floor(W * s)}px`;
    this.stage.style.height = `${Math.floor(H * s)}px`;
    this.canvas.style.imageRendering = s >= 1 ? "pixelated" : "auto";
  }

  // -- drawing -------------------------------------------------------------------------------------------
  visible() {
    return this.data.selected.map((on, i) => (on ? i : -1)).filter((i) => i >= 0);
  }

  draw() {
    const d = this.data;
    if (!d) return;
    const { H, W } = d, step = Number(this.threshold.value);
    this.thresholdText.textContent = (step / d.threshold_steps).toFixed(2);
    this.modeButton.textContent = this.mode === "mask" ? "overlay" : "mask";
    const r = this.shownRefine();
    const refined = isRefined(r);
    this.refineButton.textContent = refined ? `refined (${describeRefine(r)})` : "plain";
    this.refineButton.classList.toggle("daam-on", refined);
    this.timeText.textContent = this.bucket === 0 ? "all steps"
      : `${Math.round(d.time.edges[this.bucket - 1] * 100)}-${Math.round(d.time.edges[this.bucket] * 100)}%`
        + (refined ? " (plain)" : "");
    if (this.canvas.width !== W || this.canvas.height !== H) { this.canvas.width = W; this.canvas.height = H; }
    const g = this.canvas.getContext("2d");
    const out = g.createImageData(W, H), px = out.data, img = d.decoded[this.image];
    const base = img.picture;
    const shown = this.visible(), labels = [];
    if (this.mode === "mask") {
      // the MASK the node outputs at this threshold, one colour per word: `levels > step` (see nodes/preview.py)
      for (let p = 0; p < W * H; p++) px[p * 4 + 3] = 255;
      for (const i of shown) {
        const lv = this.shownVariant(img).levels.subarray(i * W * H, (i + 1) * W * H), [r, gr, b] = hexRgb(d.colour[i]);
        for (let p = 0; p < W * H; p++) if (lv[p] > step) { px[p * 4] = r; px[p * 4 + 1] = gr; px[p * 4 + 2] = b; }
        labels.push([i, this.centroid(lv, step)]);
      }
    } else {
      // each pixel takes the colour of the shown word whose map is strongest there, as opaque as that map
      const maps = shown.map((i) => this.mapOf(i)), rgb = shown.map((i) => hexRgb(d.colour[i]));
      const peaks = shown.map(() => [0, 0]);
      for (let p = 0; p < W * H; p++) {
        let k = -1, v = 0;
        for (let j = 0; j < maps.length; j++) {
          const m = maps[j][p];
          if (m > v) { v = m; k = j; }
          if (m > peaks[j][0]) peaks[j] = [m, p];
        }
        const a = k < 0 ? 0 : d.alpha * Math.min(v, 1);
        for (let c = 0; c < 3; c++) {
          const under = base ? base[p * 4 + c] : 0;
          px[p * 4 + c] = k < 0 ? under : under + (rgb[k][c] - under) * a;
        }
        px[p * 4 + 3] = 255;
      }
      shown.forEach((i, j) => labels.push([i, [peaks[j][1] % W + 0.5, Math.floor(peaks[j][1] / W) + 0.5]]));
    }
    g.putImageData(out, 0, 0);
    this.labels.replaceChildren(...labels.filter(([, at]) => at).map(([i, [x, y]]) => {
      const e = d.entries[i];
      const label = el("span", { className: "daam-label", textContent: (e.prompt === "negative" ? "neg: " : "") + e.key });
      label.dataset.key = e.key;
      label.style.left = `${(100 * x) / W}%`;
      label.style.top = `${(100 * y) / H}%`;
      label.style.color = d.colour[i];
      return label;
    }));
  }

  centroid(levels, step) {
    const W = this.data.W;
    let sx = 0, sy = 0, n = 0;
    for (let p = 0; p < levels.length; p++) if (levels[p] > step) { sx += p % W; sy += Math.floor(p / W); n++; }
    return n ? [sx / n + 0.5, sy / n + 0.5] : null;
  }

  // -- interaction ---------------------------------------------------------------------------------------
  onHover(e) {
    const d = this.data;
    if (!d) return;
    const r = this.canvas.getBoundingClientRect();
    const x = Math.floor(((e.clientX - r.left) / r.width) * d.W), y = Math.floor(((e.clientY - r.top) / r.height) * d.H);
    if (x < 0 || y < 0 || x >= d.W || y >= d.H) return;
    // Rank the shown words (all words when none is shown) by their attention here, unnormalised so that the
    // values compare across words; the share is of the ranked words' total at this pixel.
    const shown = this.visible();
    const pool = shown.length ? shown : d.entries.map((e, i) => (e.kind === "occurrence" ? -1 : i)).filter((i) => i >= 0);
    const ranked = pool.map((i) => [d.entries[i], this.valueAt(i, x, y)]).sort((a, b) => b[1] - a[1]);
    const total = ranked.reduce((s, [, v]) => s + v, 0) || 1;
    this.hover.replaceChildren(...ranked.slice(0, 6).map(([entry, v], k) => {
      const item = el("span", { className: "daam-rank",
        textContent: `${k ? " · " : ""}${entry.prompt === "negative" ? "neg: " : ""}${entry.key} ${Math.round((100 * v) / total)}%` });
      item.dataset.key = entry.key;
      item.dataset.value = String(v);
      return item;
    }));
    this.hover.dataset.x = String(x);
    this.hover.dataset.y = String(y);
  }

  writeBack() {
    const d = this.data;
    if (!d) return;
    const pick = (prompt) => d.entries.filter((e, i) => d.selected[i] && e.prompt === prompt).map((e) => e.key).join(", ");
    const set = (name, value) => {
      const w = this.node.widgets?.find((x) => x.name === name);
      if (!w) return;
      w.value = value;
      w.callback?.(value, app.canvas, this.node);
    };
    set("words", pick("positive"));
    set("negative_words", pick("negative"));
    set("threshold", Number(this.threshold.value) / d.threshold_steps);
    if (d.refine) {
      const r = this.shownRefine();
      set("propagate_steps", r.propagate_steps);
      set("head_power", r.head_power);
      set("map_source", r.map_source || "attention");
      set("propagate_at", r.propagate_at || "each resolution");
      set("exclusive", !!r.exclusive);
    }
    this.node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas?.(true, true);
  }
}

// Frontends from about 1.5x keep a linked widget's row ("connection suppressed") at the widget's own height and
// draw no label for DOM widgets: a linked multiline prompt became ~200 px of blank node with an unlabelled dot.
// Linked, the prompt widgets take one row, labelled like any input; unlinked they are the usual text boxes.
function linked(node, widget) {
  const slot = node.inputs?.find((i) => i.widget?.name === widget.name);
  return slot != null && slot.link != null;
}

function compactWhenLinked(node) {
  for (const name of PROMPT_TEXTS) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w || typeof w.computeLayoutSize !== "function") continue;
    const own = w.computeLayoutSize.bind(w);
    w.computeLayoutSize = (n) => linked(node, w) ? { minHeight: ROW, maxHeight: ROW, minWidth: 0 } : own(n);
  }
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments);
    if (this.flags?.collapsed) return r;
    for (const name of PROMPT_TEXTS) {
      const w = this.widgets?.find((x) => x.name === name);
      if (!w || w.y == null || !linked(this, w)) continue;
      ctx.save();
      ctx.fillStyle = globalThis.LiteGraph?.NODE_TEXT_COLOR ?? "#aaa";
      ctx.font = `${globalThis.LiteGraph?.NODE_SUBTEXT_SIZE ?? 12}px Arial`;
      ctx.textAlign = "left";
      ctx.fillText(w.label ?? name, 20, w.y + ROW * 0.5 + 5);
      ctx.restore();
    }
    return r;
  };
}

app.registerExtension({
  name: "comfyui-daam.preview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const preview = new DaamPreview(this);
      this.daamPreview = preview;
      this.addDOMWidget("daam_preview", "daam_preview", preview.root, {
        serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT });
      compactWhenLinked(this);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const payload = message?.daam_preview?.[0];
      if (payload && this.daamPreview) {
        this.daamPreview.load(payload).catch((e) => console.error("[comfyui-daam] preview:", e));
      }
    };
  },
});
