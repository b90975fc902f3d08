// ttsr-serve page: choose or drop an LR image and references, upscale, compare, download.
"use strict";

const $ = (id) => document.getElementById(id);

const state = { lr: null, refs: [], album: [], limits: null, downloadUrl: null };

function formatBytes(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MB`;
  if (bytes >= 1 << 10) return `${(bytes / (1 << 10)).toFixed(0)} kB`;
  return `${bytes} B`;
}

function setStatus(text, kind) {
  const panel = $("progress-panel");
  panel.hidden = false;
  panel.classList.toggle("error", kind === "error");
  panel.classList.toggle("done", kind === "done");
  $("status-text").textContent = text;
}

function showFiles(listId, files) {
  const list = $(listId);
  list.replaceChildren();
  for (const file of files) {
    const item = document.createElement("li");
    const thumb = document.createElement("img");
    thumb.alt = "";
    thumb.src = URL.createObjectURL(file);
    thumb.onload = thumb.onerror = () => URL.revokeObjectURL(thumb.src);
    const label = document.createElement("span");
    label.textContent = `${file.name} (${formatBytes(file.size)})`;
    item.append(thumb, label);
    list.append(item);
  }
}

function refreshForm() {
  $("upscale-button").disabled = !(state.lr && (state.refs.length || state.album.length));
}

function chooseLr(files) {
  state.lr = files.length ? files[0] : null;
  showFiles("lr-list", state.lr ? [state.lr] : []);
  refreshForm();
}

function showAlbum() {
  const count = state.album.length;
  $("album-count").textContent = count ? `${count} photo${count === 1 ? "" : "s"} to choose from` : "";
}

// References and an album are alternatives: choosing one clears the other.
function chooseRefs(files) {
  state.refs = Array.from(files);
  if (state.refs.length) state.album = [];
  showFiles("ref-list", state.refs);
  showAlbum();
  refreshForm();
}

function chooseAlbum(files) {
  state.album = Array.from(files);
  if (state.album.length) state.refs = [];
  showFiles("ref-list", state.refs);
  showAlbum();
  refreshForm();
}

function wireDropzone(zoneId, inputId, choose) {
  const zone = $(zoneId);
  const input = $(inputId);
  input.addEventListener("change", () => choose(input.files));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const images = Array.from(event.dataTransfer.files).filter((f) => f.type.startsWith("image/"));
    if (!images.length) {
      setStatus("Drop image files (PNG, JPEG, ...).", "error");
      return;
    }
    choose(images);
  });
}

function checkLimits() {
  const limits = state.limits;
  if (!limits) return null;
  const files = [state.lr, ...state.refs, ...state.album];
  const tooBig = files.find((file) => file.size > limits.max_upload_bytes);
  if (tooBig) {
    return `${tooBig.name} is ${formatBytes(tooBig.size)}; this server accepts images up to ${formatBytes(limits.max_upload_bytes)}.`;
  }
  if (state.refs.length > limits.max_references) {
    return `Choose at most ${limits.max_references} references.`;
  }
  if (state.album.length > limits.max_album) {
    return `Choose at most ${limits.max_album} album photos.`;
  }
  return null;
}

function postUpscale(form) {
  // XMLHttpRequest rather than fetch: it reports upload progress.
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    const model = $("model-select").value;
    const query = model ? `&model=${encodeURIComponent(model)}` : "";
    request.open("POST", `/api/upscale?format=json${query}`);
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) {
        $("progress").value = event.loaded / event.total;
        setStatus(`Uploading ${Math.round((100 * event.loaded) / event.total)}%`);
      }
    });
    request.upload.addEventListener("load", () => {
      $("progress").removeAttribute("value"); // indeterminate while the server works
      const started = performance.now();
      const tick = () => {
        if (request.readyState === XMLHttpRequest.DONE) return;
        const seconds = Math.round((performance.now() - started) / 1000);
        const doing = state.album.length ? "Choosing references and upscaling" : "Upscaling";
        setStatus(`${doing} on the server... ${seconds} s`);
        setTimeout(tick, 500);
      };
      tick();
    });
    request.addEventListener("load", () => {
      const body = request.response;
      if (request.status === 200 && body) resolve(body);
      else reject(new Error((body && body.error) || `the server answered ${request.status}`));
    });
    request.addEventListener("error", () => reject(new Error("the server could not be reached")));
    request.send(form);
  });
}

function pngUrl(base64) {
  return `data:image/png;base64,${base64}`;
}

function pngBlobUrl(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

function showResult(body) {
  $("bicubic-image").src = pngUrl(body.bicubic);
  $("sr-image").src = pngUrl(body.sr);
  $("result-size").textContent = `${body.width} x ${body.height}, ${body.seconds.toFixed(1)} s`;
  const chosen = $("chosen-references");
  chosen.hidden = !body.references;
  if (body.references) chosen.textContent = `References chosen from the album: ${body.references.join(", ")}`;
  for (const [id, image] of [["attention-map", body.attention], ["correspondence-map", body.correspondence]]) {
    const figure = $(id).closest("figure");
    figure.hidden = !image;
    if (image) $(id).src = pngUrl(image);
  }
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = pngBlobUrl(body.sr);
  const link = $("download-link");
  link.href = state.downloadUrl;
  link.download = body.filename;
  setSplit(50);
  $("result").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const problem = checkLimits();
  if (problem) {
    setStatus(problem, "error");
    return;
  }
  const form = new FormData();
  form.append("lr", state.lr, state.lr.name);
  for (const ref of state.refs) form.append("ref", ref, ref.name);
  for (const photo of state.album) form.append("album", photo, photo.name);
  $("upscale-button").disabled = true;
  $("progress").value = 0;
  setStatus("Uploading...");
  try {
    const started = performance.now();
    const body = await postUpscale(form);
    showResult(body);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`Done in ${seconds} s: ${body.width} x ${body.height} pixels.`, "done");
  } catch (error) {
    setStatus(`Could not upscale: ${error.message}`, "error");
  } finally {
    refreshForm();
  }
}

function setSplit(percent) {
  const value = Math.min(100, Math.max(0, percent));
  $("compare").style.setProperty("--split", `${value}%`);
  $("compare-slider").value = String(value);
}

function wireSlider() {
  const compare = $("compare");
  $("compare-slider").addEventListener("input", (event) => setSplit(Number(event.target.value)));
  const follow = (event) => {
    const box = compare.getBoundingClientRect();
    setSplit((100 * (event.clientX - box.left)) / box.width);
  };
  compare.addEventListener("pointerdown", (event) => {
    compare.setPointerCapture(event.pointerId);
    follow(event);
  });
  compare.addEventListener("pointermove", (event) => {
    if (compare.hasPointerCapture(event.pointerId)) follow(event);
  });
}

const MODEL_NOTES = {
  real: "real: for phone photos, web images, JPEG'd or noisy inputs",
  bicubic: "bicubic: the research protocol (clean bicubic downscales)",
};

function showModels(models, chosen) {
  const select = $("model-select");
  select.replaceChildren(
    ...models.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = MODEL_NOTES[name] || name;
      option.selected = name === chosen;
      return option;
    }),
  );
  $("model-choice").hidden = models.length < 2;
}

async function loadLimits() {
  try {
    const response = await fetch("/api/info");
    if (!response.ok) return;
    state.limits = await response.json();
    showModels(state.limits.models || [], state.limits.model);
    $("limits").textContent =
      `Up to ${formatBytes(state.limits.max_upload_bytes)} per image, ` +
      `${state.limits.max_references} references or ${state.limits.max_album} album photos; ` +
      `runs on ${state.limits.device}.`;
  } catch (error) {
    // The limits are only a convenience: the server enforces them anyway.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  wireDropzone("lr-drop", "lr-input", chooseLr);
  wireDropzone("ref-drop", "ref-input", chooseRefs);
  wireDropzone("album-drop", "album-input", chooseAlbum);
  wireSlider();
  $("upscale-form").addEventListener("submit", submit);
  loadLimits();
});
