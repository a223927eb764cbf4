// vlkit's web page: a chat pane that streams answers from /v1/chat/completions and a photo
// search pane over /v1/search. Plain browser JavaScript, no build step, no external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], attachment: null, busy: false };

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

// ---------------------------------------------------------------- models
async function loadModels() {
  const select = $("model-select");
  try {
    const resp = await fetch("v1/models", { headers: headers(false) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const chat = (await resp.json()).data.filter((m) => (m.kind || "chat") === "chat");
    select.replaceChildren(...chat.map((m) => new Option(m.id, m.id)));
    setStatus(chat.length ? "" : "no chat model is served");
  } catch (e) {
    setStatus("models: " + e.message, true);
  }
}

// ---------------------------------------------------------------- chat
function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function attach(dataURL) {
  state.attachment = dataURL;
  $("attachment-preview").src = dataURL;
  $("attachment").hidden = !dataURL;
}

async function attachFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("not an image: " + (file ? file.name : "nothing"), true);
    return;
  }
  attach(await fileToDataURL(file));
}

function addMessage(role, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "image sent";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

// Reads a server-sent-event stream of chat.completion.chunk objects, calling onDelta per text piece.
async function readStream(resp, onDelta) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "stream error");
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) onDelta(choice.delta.content);
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (state.busy || (!text && !state.attachment)) return;
  const model = $("model-select").value;
  if (!model) {
    setStatus("no chat model to send to", true);
    return;
  }
  const content = [];
  if (state.attachment) content.push({ type: "image_url", image_url: { url: state.attachment } });
  if (text) content.push({ type: "text", text });
  addMessage("user", text, state.attachment);
  state.history.push({ role: "user", content });
  $("chat-input").value = "";
  attach(null);
  const bubble = addMessage("assistant streaming", "");
  const out = bubble.querySelector(".text");
  state.busy = true;
  $("chat-send").disabled = true;
  let answer = "";
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model, messages: state.history, stream: true }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readStream(resp, (piece) => {
      answer += piece;
      out.textContent = answer;
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    });
    state.history.push({ role: "assistant", content: answer });
    bubble.classList.add("done");
    setStatus("");
  } catch (e) {
    state.history.pop();
    bubble.classList.add("error", "done");
    out.textContent = answer + (answer ? "\n" : "") + "error: " + e.message;
  } finally {
    bubble.classList.remove("streaming");
    state.busy = false;
    $("chat-send").disabled = false;
  }
}

// ---------------------------------------------------------------- search
function resultCard(hit) {
  const card = document.createElement("button");
  card.type = "button";
  card.className = "result";
  card.dataset.path = hit.path;
  card.title = "ask the model about " + hit.path;
  const img = document.createElement("img");
  img.alt = hit.path;
  if (hit.thumbnail) img.src = hit.thumbnail;
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = hit.path;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  card.append(img, path, score);
  card.addEventListener("click", () => askAbout(hit.path));
  return card;
}

async function search(event) {
  event.preventDefault();
  const query = $("search-input").value.trim();
  if (!query) return;
  const k = Math.max(1, Math.min(100, parseInt($("search-k").value, 10) || 12));
  $("search-info").textContent = "searching…";
  try {
    const resp = await fetch("v1/search", { method: "POST", headers: headers(), body: JSON.stringify({ query, k }) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    $("search-results").replaceChildren(...body.results.map(resultCard));
    const idx = body.index || {};
    $("search-info").textContent =
      `${body.results.length} of ${idx.size} images (${idx.kind} search, model ${idx.model})`;
  } catch (e) {
    $("search-results").replaceChildren();
    $("search-info").textContent = "search failed: " + e.message;
  }
}

async function askAbout(path) {
  try {
    const resp = await fetch("v1/search/image?path=" + encodeURIComponent(path), { headers: headers(false) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const blob = await resp.blob();
    attach(await fileToDataURL(blob));
    if (!$("chat-input").value.trim()) $("chat-input").value = "Describe this image.";
    $("chat-input").focus();
    setStatus("attached " + path);
  } catch (e) {
    setStatus("image " + path + ": " + e.message, true);
  }
}

// ---------------------------------------------------------------- wiring
function imageFromTransfer(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function init() {
  $("api-key").value = localStorage.getItem("vlkit-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("vlkit-api-key", $("api-key").value.trim());
    loadModels();
  });
  $("chat-form").addEventListener("submit", send);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("chat-attach").addEventListener("change", (e) => attachFile(e.target.files[0]).then(() => (e.target.value = "")));
  $("attachment-remove").addEventListener("click", () => attach(null));
  $("chat-clear").addEventListener("click", () => {
    state.history = [];
    $("chat-log").replaceChildren();
  });
  document.addEventListener("paste", (e) => {
    const file = imageFromTransfer(e.clipboardData && e.clipboardData.items);
    if (file) {
      e.preventDefault();
      attachFile(file);
    }
  });
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    const file = imageFromTransfer(e.dataTransfer && e.dataTransfer.items);
    if (file) attachFile(file);
  });
  $("search-form").addEventListener("submit", search);
  loadModels();
}

init();
