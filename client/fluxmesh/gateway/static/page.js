// The fluxmesh page: one generation at a time through the gateway's own OpenAI-style API
// (POST /v1/images/generations or /v1/images/edits with stream: true), nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { controller: null, sizeMultiple: 16, loras: [] };
// Which form field an API error's `param` names (loras[0].name -> loras).
const FIELD_OF = { n: "prompt", model: "prompt", output_format: "prompt" };

function headers(extra = {}) {
  const token = $("token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path) {
  const reply = await fetch(path, { headers: headers() });
  const body = await reply.json();
  if (!reply.ok) throw body.error || { message: reply.statusText };
  return body;
}

async function loadServer() {
  try {
    const models = await api("/v1/models");
    const model = models.data[0];
    state.sizeMultiple = model.size_multiple;
    $("model").textContent = `${model.id} · ${model.kind} · sizes in steps of ${model.size_multiple}`;
    for (const id of ["width", "height"]) $(id).step = model.size_multiple;
    if (model.kind === "schnell" && $("steps").value === "28") $("steps").value = 4;
    $("guidance").disabled = !model.guidance_embeds;
    showFormError("");
  } catch (error) {
    $("model").textContent = "not connected";
    showFormError(error.message || String(error));
    return;
  }
  try {
    state.loras = (await api("/v1/loras")).data;
  } catch (error) {
    state.loras = [];
  }
  const box = $("loras");
  box.replaceChildren();
  box.classList.toggle("muted", state.loras.length === 0);
  if (state.loras.length === 0) box.textContent = "none offered";
  for (const lora of state.loras) {
    const label = document.createElement("label");
    const pick = Object.assign(document.createElement("input"), { type: "checkbox", value: lora.name });
    const weight = Object.assign(document.createElement("input"), { type: "number", step: "0.05", value: "1",
                                                                    min: "-4", max: "4", title: "weight" });
    pick.className = "lora";
    weight.className = "lora-weight";
    label.append(pick, document.createTextNode(lora.name), weight);
    box.append(label);
  }
}

function clearErrors() {
  for (const field of document.querySelectorAll(".field")) {
    field.classList.remove("invalid");
    field.querySelector(".error").textContent = "";
  }
  showFormError("");
}

function showFormError(message) {
  $("form-error").textContent = message;
}

function showError(error) {
  const param = (error.param || "").split(/[.[]/)[0];
  const name = FIELD_OF[param] || param;
  const field = name && document.querySelector(`.field[data-param="${name}"]`);
  if (field) {
    field.classList.add("invalid");
    field.querySelector(".error").textContent = error.message;
    if (field.closest("details")) field.closest("details").open = true;
  } else {
    showFormError(error.message || "the request failed");
  }
}

function request() {
  const seed = $("random-seed").checked ? Math.floor(Math.random() * 2 ** 31) : Number($("seed").value);
  if ($("random-seed").checked) $("seed").value = seed;
  const steps = Number($("steps").value);
  const loras = [...document.querySelectorAll("input.lora:checked")].map((pick) => ({
    name: pick.value, weight: Number(pick.parentElement.querySelector(".lora-weight").value) }));
  const body = {
    prompt: $("prompt").value, size: `${$("width").value}x${$("height").value}`, steps, seed, loras,
    stream: true, partial_images: Math.min(Math.max(steps, 0), 100), progress: true, response_format: "b64_json", output_format: "png",
  };
  if (!$("guidance").disabled) body.guidance = Number($("guidance").value);
  return body;
}

function send(body, signal) {
  const image = $("image").files[0];
  if (!image) {
    return fetch("/v1/images/generations", { method: "POST", signal, body: JSON.stringify(body),
                                             headers: headers({ "Content-Type": "application/json" }) });
  }
  const form = new FormData();
  for (const [key, value] of Object.entries(body)) {
    form.append(key, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  form.append("image", image);
  if ($("mask").files[0]) form.append("mask", $("mask").files[0]);
  form.append("strength", $("strength").value);
  return fetch("/v1/images/edits", { method: "POST", signal, body: form, headers: headers() });
}

async function* serverSentEvents(reply) {
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

function setProgress(step, total, text) {
  $("bar").style.width = total ? `${(100 * step) / total}%` : "0";
  $("status").textContent = text;
}

function addToGallery(event, body) {
  const info = event.fluxmesh;
  const figure = document.createElement("figure");
  figure.dataset.seed = info.seed;
  const img = Object.assign(document.createElement("img"), {
    src: `data:image/${event.output_format};base64,${event.b64_json}`, alt: body.prompt });
  const caption = document.createElement("figcaption");
  const prompt = Object.assign(document.createElement("div"), { className: "prompt", textContent: body.prompt });
  const facts = document.createElement("div");
  const loras = body.loras.map((l) => `${l.name}:${l.weight}`).join(", ");
  facts.textContent = `${info.width}×${info.height} · ${info.steps} steps · guidance ${info.guidance} · ` +
    `seed ${info.seed}${loras ? ` · ${loras}` : ""} · ${info.timings.total.toFixed(2)} s`;
  const reuse = Object.assign(document.createElement("button"), { type: "button", textContent: "use these settings" });
  reuse.addEventListener("click", () => {
    $("prompt").value = body.prompt;
    [$("width").value, $("height").value] = [info.width, info.height];
    $("steps").value = body.steps;
    $("seed").value = info.seed;
    $("random-seed").checked = false;
  });
  caption.append(prompt, facts, reuse);
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

async function generate(submit) {
  submit.preventDefault();
  clearErrors();
  if (!$("prompt").value.trim()) return showError({ param: "prompt", message: "prompt: must not be empty" });
  const body = request();
  const controller = new AbortController();
  state.controller = controller;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  const preview = $("preview");
  preview.dataset.count = "0";
  setProgress(0, body.steps, "sending…");
  try {
    const reply = await send(body, controller.signal);
    if (!reply.ok) {
      const answer = await reply.json().catch(() => ({}));
      showError(answer.error || { message: `${reply.status} ${reply.statusText}` });
      setProgress(0, 0, "failed");
      return;
    }
    for await (const { event, data } of serverSentEvents(reply)) {
      if (event === "fluxmesh.queued") setProgress(0, 1, `queued, position ${data.position + 1}`);
      else if (event === "fluxmesh.stage" && data.stage !== "denoise") setProgress(0, 0, `${data.stage}…`);
      else if (event === "fluxmesh.step") setProgress(data.step, data.total, `step ${data.step} / ${data.total}`);
      else if (event.endsWith(".partial_image")) {
        preview.src = `data:image/${data.output_format};base64,${data.b64_json}`;
        preview.hidden = false;
        preview.dataset.count = String(Number(preview.dataset.count) + 1);
        preview.dataset.step = data.step;
      } else if (event.endsWith(".completed")) {
        preview.src = `data:image/${data.output_format};base64,${data.b64_json}`;
        addToGallery(data, body);
        setProgress(1, 1, `done: seed ${data.fluxmesh.seed}, ${data.fluxmesh.timings.total.toFixed(2)} s`);
      } else if (event === "error") {
        showError(data.error);
        setProgress(0, 0, "failed");
      }
    }
  } catch (error) {
    if (controller.signal.aborted) setProgress(0, 0, "cancelled");
    else { showFormError(String(error.message || error)); setProgress(0, 0, "failed"); }
  } finally {
    state.controller = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function init() {
  $("token").value = sessionStorage.getItem("fluxmesh-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("fluxmesh-token", $("token").value.trim());
    loadServer();
  });
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => state.controller && state.controller.abort());
  loadServer();
}

document.addEventListener("DOMContentLoaded", init);
