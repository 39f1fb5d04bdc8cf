// mnist-k8s page: draw or upload a digit, POST it to /predict, show the answer.
// Plain JavaScript, no libraries, nothing inline (the page runs under a strict Content-Security-Policy).
"use strict";

(() => {
  const root = document.body.dataset.root || "";
  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const predictBtn = $("predict");
  const bars = [...document.querySelectorAll("#chart .bar")];
  let ready = document.body.dataset.ready === "true";
  let version = document.body.dataset.version || "";
  let dirty = false;        // something drawn since the last clear
  let drawing = null;       // {x, y} of the last point while a stroke is in progress
  let seq = 0;              // only the newest answer is shown
  let autoTimer = 0;
  let previewUrl = null;

  // ---- drawing pad: white ink on black, like MNIST (preprocessing would invert the other way round too) ----
  function clearPad() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
    dirty = false;
    $("pad-hint").hidden = false;
    updateButtons();
  }

  function point(e) {
    const r = pad.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * pad.width) / r.width, y: ((e.clientY - r.top) * pad.height) / r.height };
  }

  function stroke(from, to) {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = pad.width / 13;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    e.preventDefault();
    pad.setPointerCapture(e.pointerId);
    clearTimeout(autoTimer);
    drawing = point(e);
    stroke(drawing, drawing);           // a dot for a tap
    dirty = true;
    $("pad-hint").hidden = true;
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of events.length ? events : [e]) {
      const p = point(ev);
      stroke(drawing, p);
      drawing = p;
    }
  });
  const endStroke = () => {
    if (!drawing) return;
    drawing = null;
    updateButtons();
    clearTimeout(autoTimer);
    autoTimer = setTimeout(predictPad, 350);   // predict on release (after a short pause for the next stroke)
  };
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  $("clear").addEventListener("click", () => { clearTimeout(autoTimer); clearPad(); resetResult(); });
  predictBtn.addEventListener("click", predictPad);

  function predictPad() {
    if (!dirty || !ready) return;
    hidePreview();
    pad.toBlob((blob) => blob && send(blob, "drawing.png"), "image/png");
  }

  // ---- upload: file picker or drag and drop ----
  const dz = $("dropzone");
  $("file").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) upload(f); e.target.value = ""; });
  dz.addEventListener("dragover", (e) => { e.preventDefault(); dz.classList.add("over"); });
  dz.addEventListener("dragleave", () => dz.classList.remove("over"));
  dz.addEventListener("drop", (e) => {
    e.preventDefault();
    dz.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) upload(f);
  });

  function upload(file) {
    hidePreview();
    previewUrl = URL.createObjectURL(file);
    const img = $("preview");
    img.src = previewUrl;
    img.hidden = false;
    send(file, file.name || "upload");
  }

  function hidePreview() {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    $("preview").hidden = true;
  }

  // ---- talking to the API ----
  async function send(blob, name) {
    const mine = ++seq;
    const form = new FormData();
    form.append("file", blob, name);
    clearResult();                      // never show the previous answer beside a new image
    $("confidence").textContent = "Reading\u2026";
    setBusy(true);
    try {
      const res = await fetch(root + "/predict", { method: "POST", body: form });
      const body = await res.json().catch(() => ({ error: "bad_response", detail: `HTTP ${res.status}` }));
      if (mine !== seq) return;
      if (!res.ok) { showError(body.detail || body.error || `HTTP ${res.status}`); if (res.status === 503) setReady(false); return; }
      showResult(body);
      if (body.version !== version) { version = body.version; refreshModel(); }
    } catch (err) {
      if (mine === seq) showError("The server could not be reached. " + err.message);
    } finally {
      if (mine === seq) setBusy(false);
    }
  }

  function showResult(r) {
    $("error").hidden = true;
    const best = r.digit;
    const sure = r.confident !== false;                 // servers without the flag answer only when sure
    const p = typeof r.confidence === "number" ? r.confidence : r.probabilities[best];
    const digit = $("digit");
    digit.textContent = sure ? String(best) : "?";
    digit.classList.add("has");
    digit.classList.toggle("unsure", !sure);
    $("confidence").textContent = sure ? `It's a ${best} (${(p * 100).toFixed(1)}% sure)` : "Not sure: is this one digit?";
    $("timing").textContent = (sure ? "" : `if it is a digit, most likely a ${best} · `) +
      `model ${r.version} · ${r.inference_ms.toFixed(1)} ms`;
    $("chart").classList.toggle("unsure", !sure);
    bars.forEach((bar, i) => {
      const v = r.probabilities[i];
      bar.querySelector(".fill").style.height = `${Math.max(v * 100, 0)}%`;
      bar.querySelector(".pct").textContent = v >= 0.995 ? "100%" : v >= 0.001 ? `${(v * 100).toFixed(1)}%` : "0%";
      bar.classList.toggle("top", sure && i === best);
      bar.title = `${i}: ${(v * 100).toFixed(2)}%`;
    });
    $("chart").setAttribute("aria-label", "Probabilities: " + r.probabilities.map((v, i) => `${i} ${(v * 100).toFixed(1)}%`).join(", "));
  }

  function clearResult() {
    $("error").hidden = true;
    $("digit").textContent = "?";
    $("digit").classList.remove("has", "unsure");
    $("confidence").textContent = "";
    $("timing").textContent = "";
    $("chart").classList.remove("unsure");
    $("chart").setAttribute("aria-label", "Probability of each digit");
    bars.forEach((bar) => {
      bar.querySelector(".fill").style.height = "0%";
      bar.querySelector(".pct").textContent = "\u00a0";
      bar.classList.remove("top");
      bar.removeAttribute("title");
    });
  }

  function resetResult() {
    seq++;
    setBusy(false);
    hidePreview();
    clearResult();
    $("confidence").textContent = "Draw or upload a digit to see what the model thinks.";
  }

  function showError(msg) {
    clearResult();                      // only the error: no answer, no chart
    const el = $("error");
    el.textContent = msg;
    el.hidden = false;
  }

  function setBusy(busy) { document.body.classList.toggle("busy", busy); }
  function updateButtons() { predictBtn.disabled = !ready || !dirty; }

  // ---- model card and readiness ----
  function fact(label, value) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = value;
    div.append(dt, dd);
    return div;
  }

  function when(s) {
    const d = new Date(s);
    return !s ? "n/a" : isNaN(d) ? String(s) : d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function renderModel(m) {
    const facts = [];
    const v = fact("Version", "");
    const code = document.createElement("code");
    code.textContent = m.version;
    v.querySelector("dd").append(code);
    facts.push(v);
    const acc = m.test_accuracy;
    facts.push(fact("Test accuracy", typeof acc === "number" ? `${(acc * 100).toFixed(2)}%` : acc ? String(acc) : "n/a"));
    facts.push(fact("Trained", when(m.created_at)));
    const n = (x) => x.toLocaleString("en-US");
    const size = m.dataset && m.dataset.train_size, epochs = m.params && m.params.epochs;
    if (typeof size === "number") {
      const times = typeof epochs === "number" ? ` \u00d7 ${epochs} epoch${epochs === 1 ? "" : "s"}` : "";
      facts.push(fact("Trained on", `${n(size)} digits${times}`));
    }
    if (typeof m.train_seconds === "number") facts.push(fact("Training time", `${Math.round(m.train_seconds)} s`));
    if (typeof m.n_parameters === "number") facts.push(fact("Parameters", n(m.n_parameters)));
    $("model-facts").replaceChildren(...facts);
    $("report-link").hidden = false;
  }

  async function refreshModel() {
    try {
      const res = await fetch(root + "/model");
      if (res.ok) { const m = await res.json(); version = m.version; renderModel(m); setReady(true); }
    } catch (_) { /* the next poll retries */ }
  }

  function setReady(ok) {
    ready = ok;
    $("no-model").hidden = ok;
    updateButtons();
    if (!ok) pollReady();
  }

  let polling = false;
  async function pollReady() {
    if (polling) return;
    polling = true;
    while (!ready) {
      try {
        const res = await fetch(root + "/readyz");
        if (res.ok) { await refreshModel(); break; }
      } catch (_) { /* server restarting: keep polling */ }
      await new Promise((r) => setTimeout(r, 2500));
    }
    polling = false;
  }

  clearPad();
  if (!ready) pollReady();
})();
