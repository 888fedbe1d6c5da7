// DAAM frontend: after 'DAAM Heatmaps' runs, list the prompt's words on the node; clicking a word adds it to
// (or removes it from) the node's `words` field, so maps can be explored without retyping.
import { app } from "../../scripts/app.js";

function toggleWord(node, word) {
  const widget = node.widgets?.find((w) => w.name === "words");
  if (!widget) return;
  const words = String(widget.value || "").split(",").map((w) => w.trim()).filter((w) => w);
  const at = words.indexOf(word);
  if (at >= 0) words.splice(at, 1); else words.push(word);
  widget.value = words.join(", ");
  widget.callback?.(widget.value);
  node.setDirtyCanvas(true, true);
}

function showWords(node, words) {
  let holder = node.__daamWords;
  if (!holder) {
    holder = document.createElement("div");
    holder.style.cssText = "display:flex;flex-wrap:wrap;gap:4px;padding:4px;font-size:12px;overflow:auto";
    node.addDOMWidget("daam_words", "daam_words", holder, { serialize: false, hideOnZoom: false });
    node.__daamWords = holder;
  }
  holder.replaceChildren(...words.map((word) => {
    const chip = document.createElement("button");
    chip.textContent = word;
    chip.title = "Add or remove this word from 'words'";
    chip.style.cssText = "padding:1px 6px;border-radius:8px;border:1px solid #666;background:#333;color:#eee;cursor:pointer";
    chip.onclick = () => toggleWord(node, word);
    return chip;
  }));
}

app.registerExtension({
  name: "comfyui-daam.words",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DAAMHeatmaps") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const words = message?.daam_words;
      if (Array.isArray(words) && words.length) showWords(this, [...new Set(words)]);
    };
  },
});
