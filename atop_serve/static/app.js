// atop-serve's web page: plain JavaScript, no framework, no build step. It calls the public API like any client:
// GET /metadata and /samples once, POST /inspect for an image, POST /attack_demo on request.
"use strict";

const state = { file: null, name: "", meta: null, busy: false, again: false };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------ API
async function api(path, form) {
  let resp;
  try {
    resp = await fetch(path, form ? { method: "POST", body: form } : {});
  } catch (e) {
    throw new Error(`cannot reach the server (${e.message})`);
  }
  if (!resp.ok) {
    let message = `the server answered ${resp.status} ${resp.statusText}`;
    try {
      const body = await resp.json();
      if (body && body.error) message = `${body.error} (HTTP ${resp.status})`;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return resp.json();
}

function imageForm() {
  const form = new FormData();
  form.append("image", state.file, state.name);
  form.append("samples", $("samples-k").value);
  return form;
}

// ------------------------------------------------------------------------------------------ status
function setState(name, status) {
  document.body.dataset.state = name;
  $("status").textContent = status || "";
}

function showError(message) {
  const box = $("error");
  box.textContent = `Error: ${message}`;
  box.hidden = false;
  setState("error", "");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function pct(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1)} %`;
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ------------------------------------------------------------------------------------------ classify
async function choose(file, name) {
  state.file = file;
  state.name = name || file.name || "image";
  $("attack-result").hidden = true;
  await inspect();
}

async function inspect() {
  if (!state.file) return;
  if (state.busy) {  // another image or K was chosen meanwhile: classify it when this request is done
    state.again = true;
    return;
  }
  state.busy = true;
  clearError();
  setState("busy", `Classifying ${state.name}…`);
  try {
    const answer = await api("/inspect", imageForm());
    render(answer);
    setState("done", "");
    $("attack-button").disabled = !(state.meta && state.meta.serving.attack_demo.available);
  } catch (e) {
    $("result").hidden = true;
    $("attack").hidden = true;
    showError(e.message);
  } finally {
    state.busy = false;
    if (state.again) {
      state.again = false;
      inspect();
    }
  }
}

function render(answer) {
  $("input-img").src = answer.input;
  $("label").textContent = answer.label;
  $("confidence").textContent = `${pct(answer.probabilities[answer.label])} (mean of ${answer.samples} sample${answer.samples > 1 ? "s" : ""})`;
  $("bars-note").textContent = answer.samples > 1 ? `(mean over ${answer.samples} samples)` : "";
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(answer.probabilities)) {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    const row = el("div", { class: name === answer.label ? "bar top" : "bar" }, [
      el("span", { class: "name", text: name }), el("div", { class: "track" }, [fill]),
      el("span", { class: "value", text: pct(p) }),
    ]);
    bars.append(row);
  }
  const views = $("views");
  views.replaceChildren();
  answer.views.forEach((v, i) => {
    const pic = (src, alt) => el("img", { class: "pixel small-pixel", src, alt });
    views.append(el("div", { class: "view" }, [
      el("div", { class: "small", text: `sample ${i + 1}${v.mirrored ? " (mirrored)" : ""}` }),
      el("div", { class: "triple" }, [pic(v.transformed, "RT(x)"), pic(v.mask, "mask"), pic(v.purified, "g(RT(x))")]),
      el("div", { class: "small captions", text: "RT(x) · mask · g(RT(x))" }),
      el("div", { class: "small" }, [el("b", { text: v.label }), ` ${pct(v.probability)}`]),
    ]));
  });
  $("result").hidden = false;
  $("attack").hidden = false;
}

// ------------------------------------------------------------------------------------------ attack
async function attack() {
  if (!state.file || state.busy) return;
  state.busy = true;
  clearError();
  $("attack-button").disabled = true;
  const limit = state.meta ? state.meta.serving.attack_demo.time_limit_s : "a few";
  setState("attacking", `Attacking the bare classifier (up to ${limit} s)…`);
  try {
    const a = await api("/attack_demo", imageForm());
    renderAttack(a);
    setState("attacked", "");
  } catch (e) {
    showError(e.message);
  } finally {
    state.busy = false;
    $("attack-button").disabled = false;
  }
}

function tag(node, good, yes, no) {
  node.textContent = good ? yes : no;
  node.className = `tag ${good ? "ok" : "bad"}`;
}

function renderAttack(a) {
  $("atk-input").src = a.images.input;
  $("atk-adv").src = a.images.adversarial;
  $("atk-adv2").src = a.images.adversarial;
  $("atk-pert").src = a.images.perturbation;
  $("atk-download").href = a.images.adversarial;
  $("atk-mag").textContent = `(×${Math.round(255 / (2 * a.attack.eps_255))})`;
  $("atk-bare-clean").textContent = `${a.bare.clean.label} ${pct(a.bare.clean.probabilities[a.bare.clean.label])}`;
  $("atk-bare-adv").textContent = `${a.bare.adversarial.label} ${pct(a.bare.adversarial.probabilities[a.bare.adversarial.label])}`;
  $("atk-pur-adv").textContent = `${a.purified.adversarial.label} ${pct(a.purified.adversarial.probabilities[a.purified.adversarial.label])}`;
  // red "fooled" is the attack's success against the bare classifier; green "defended" is the defence's
  const fooled = $("atk-fooled");
  fooled.textContent = a.fooled ? "fooled" : "not fooled";
  fooled.className = `tag ${a.fooled ? "bad" : "neutral"}`;
  tag($("atk-defended"), a.defended, "defended", "not defended");
  const why = { fooled: "the bare classifier was fooled", time: "time limit reached", queries: "query budget spent" };
  $("atk-stats").textContent = `Square attack, l∞ ≤ ${a.attack.eps_255}/255 (largest change ${a.attack.linf_255}/255): `
    + `${a.attack.queries} queries in ${a.attack.seconds.toFixed(2)} s, stopped: ${why[a.attack.stopped] || a.attack.stopped}. `
    + `Defended = the defence still answers the bare classifier's clean label (${a.bare.clean.label}); `
    + `purified predictions average ${a.samples} sample${a.samples > 1 ? "s" : ""}; `
    + `on the clean image the defence says ${a.purified.clean.label}.`;
  $("attack-result").hidden = false;
}

// ------------------------------------------------------------------------------------------ set-up
async function loadSample(s) {
  if (state.busy) return;
  try {
    const resp = await fetch(s.url);
    if (!resp.ok) throw new Error(`cannot load ${s.url} (HTTP ${resp.status})`);
    await choose(await resp.blob(), `${s.name}.png`);
  } catch (e) {
    showError(e.message);
  }
}

function describe(meta) {
  const s = meta.serving;
  const rt = (meta.purifier || {}).rt || {};
  const parts = [`model ${s.model}`, `${meta.classes.length} classes`];
  if (rt.kind) parts.push(`RT ${rt.kind}: ${rt.block}×${rt.block} blocks removed with rate ${rt.rate}, noise σ ${rt.sigma}`);
  parts.push(`${s.backend} (${s.providers.join(", ")})`);
  return parts.join(" · ");
}

async function init() {
  const file = $("file");
  file.addEventListener("change", () => {
    if (file.files.length) choose(file.files[0]);
    file.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
  });
  $("samples-k").addEventListener("change", inspect);
  $("attack-button").addEventListener("click", attack);

  try {
    state.meta = await api("/metadata");
  } catch (e) {
    showError(`cannot read /metadata: ${e.message}`);
    return;
  }
  $("model-info").textContent = describe(state.meta);
  const k = $("samples-k");
  const most = state.meta.serving.limits.max_samples;
  for (let i = 1; i <= most; i++) k.append(el("option", { value: String(i), text: String(i) }));
  k.value = String(state.meta.serving.limits.default_samples || Math.min(4, most));
  const demo = state.meta.serving.attack_demo;
  $("eps").textContent = `${demo.eps_255}/255`;
  $("attack-note").textContent = demo.available
    ? `at most ${demo.max_queries} queries and ${demo.time_limit_s} s`
    : `not available on this server: ${demo.reason}`;

  try {
    const samples = await api("/samples");
    const box = $("samples");
    for (const s of samples) {
      const button = el("button", { type: "button", class: "sample", title: s.label, "data-name": s.name }, [
        el("img", { src: s.url, alt: s.label, class: "pixel thumb" }), el("span", { text: s.label }),
      ]);
      button.addEventListener("click", () => loadSample(s));
      box.append(button);
    }
  } catch (e) {
    showError(`cannot list the bundled images: ${e.message}`);
    return;
  }
  setState("ready", "");
}

init();
