// The page's glue: fetch (or pick) a model folder's files with progress,
// hand them to the wasm module (web/src/lib.rs), wire chat and Verify.
// No build step: a plain ES module over wasm-bindgen's `--target web` output.
import init, { WebGpu, Session } from "./pkg/wgllm_web.js";

const $ = (id) => document.getElementById(id);
const OPTIONAL = [
  "tokenizer.json", "tokenizer_config.json", "generation_config.json",
  "chat_template.jinja", "reference_f32.safetensors", "reference_bf16.safetensors",
];

let gpu = null;
let session = null;

function status(text, done, total) {
  $("status").textContent = text;
  $("progress").max = total || 1;
  $("progress").value = done || 0;
}

function showError(e) {
  const msg = (e && e.message) ? e.message : String(e);
  $("error").textContent = msg;
  status("error", 0, 1);
  return msg;
}

async function device() {
  if (!gpu) {
    if (!navigator.gpu) {
      throw new Error("this browser has no WebGPU (navigator.gpu is missing); " +
        "Chromium without a GPU needs --enable-unsafe-webgpu --use-webgpu-adapter=swiftshader");
    }
    gpu = await WebGpu.open();
    $("adapter").textContent = "WebGPU adapter: " + gpu.describe();
  }
  return gpu;
}

// GET base+name as bytes, reporting progress; null on 404 when optional.
async function fetchBytes(base, name, optional, progress) {
  const r = await fetch(base + name);
  if (!r.ok) {
    if (optional) return null;
    throw new Error(`${base}${name}: HTTP ${r.status} ${r.statusText}`);
  }
  const total = Number(r.headers.get("Content-Length")) || 0;
  const reader = r.body.getReader();
  const chunks = [];
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    got += value.length;
    progress(name, got, total);
  }
  const out = new Uint8Array(got);
  let off = 0;
  for (const c of chunks) { out.set(c, off); off += c.length; }
  return out;
}

// A model folder over HTTP: config.json, then model.safetensors or the
// index and its shards, then the optional files. Missing weights are left
// to the loader, whose error names what the folder lacks.
async function fetchFolder(base) {
  if (!base.endsWith("/")) base += "/";
  const files = new Map();
  const notes = [];
  const progress = (name, got, total) =>
    status(`downloading ${name}: ${(got / 1048576).toFixed(1)} MiB` +
      (total ? ` of ${(total / 1048576).toFixed(1)} MiB` : ""), got, total);
  files.set("config.json", await fetchBytes(base, "config.json", false, progress));
  const single = await fetchBytes(base, "model.safetensors", true, progress);
  if (single) {
    files.set("model.safetensors", single);
  } else {
    notes.push("model.safetensors: HTTP 404");
    const index = await fetchBytes(base, "model.safetensors.index.json", true, progress);
    if (index) {
      files.set("model.safetensors.index.json", index);
      const map = JSON.parse(new TextDecoder().decode(index)).weight_map || {};
      for (const shard of [...new Set(Object.values(map))].sort()) {
        const b = await fetchBytes(base, shard, true, progress);
        if (b) files.set(shard, b); else notes.push(`${shard}: HTTP 404`);
      }
    } else {
      notes.push("model.safetensors.index.json: HTTP 404");
    }
  }
  for (const name of OPTIONAL) {
    const b = await fetchBytes(base, name, true, progress);
    if (b) files.set(name, b);
  }
  return { label: base, files, notes };
}

async function pickedFolder(list) {
  const files = new Map();
  let label = "picked files";
  for (const f of list) {
    const path = f.webkitRelativePath || f.name;
    if (path.includes("/")) label = path.split("/")[0];
    status(`reading ${f.name}`, 0, 1);
    files.set(f.name, new Uint8Array(await f.arrayBuffer()));
  }
  return { label, files, notes: [] };
}

// Load a folder with the page's "max context" and "weights" fields.
async function load(folder) {
  const g = await device();
  const maxContext = Number($("max-context").value) || 0;
  const dtype = $("dtype").value;
  status("uploading to the GPU", 1, 1);
  const names = [...folder.files.keys()];
  const data = names.map((n) => folder.files.get(n));
  if (session) { session.free(); session = null; }
  try {
    session = Session.load(g, folder.label, names, data, maxContext, dtype);
  } catch (e) {
    const note = folder.notes.length ? ` [${folder.notes.join("; ")}]` : "";
    throw new Error(String(e) + note);
  }
  $("model-info").textContent = `${folder.label}: ${session.describe()}`;
  status("loaded", 1, 1);
  return session;
}

async function loadFrom(fn) {
  $("error").textContent = "";
  try { await load(await fn()); } catch (e) { showError(e); }
}

// The verify table, one line per tap; the first failing tap's line marked.
function showTable(text) {
  const pre = $("verify-table");
  pre.textContent = "";
  for (const line of text.split("\n")) {
    const span = document.createElement("span");
    span.textContent = line + "\n";
    if (line.includes("<< first failure")) span.className = "first";
    else if (/ FAIL\b/.test(line)) span.className = "bad";
    pre.appendChild(span);
  }
  const first = pre.querySelector(".first");
  // The table scrolls; bring the first failing tap into view (the pre is
  // its rows' offsetParent: position relative).
  pre.scrollTop = first ? first.offsetTop - pre.clientHeight / 3 : 0;
}

async function verify(ids) {
  const r = JSON.parse(await session.verify(new Uint32Array(ids), $("bug").value));
  $("verify-summary").textContent =
    `${r.pass ? "PASS" : "FAIL"}: ` +
    r.reports.map((x) => `${x.rows.filter((t) => t.pass).length} of ${x.rows.length} taps ` +
      `within tolerance against ${x.against}`).join(", ") +
    ` on ${r.adapter || "the page's adapter"} (${r.backend}), kernels ${r.kernels}, ` +
    `${r.tokens.length} tokens` +
    r.reports.map((x) => x.first_failure ? `; first failing tap vs ${x.against}: ${x.first_failure}` : "").join("");
  $("verify-summary").className = r.pass ? "pass" : "fail";
  showTable(r.table);
  return r;
}

async function chat() {
  $("reply").textContent = "";
  $("chat-stats").textContent = "";
  const g = JSON.parse(await session.chat($("prompt").value, Number($("max-tokens").value) || 48,
    (t) => { $("reply").textContent += t; }));
  $("chat-stats").textContent =
    `${g.prompt_ids.length} prompt tokens, ${g.generated_ids.length} generated (${g.stop_reason}); ` +
    `prefill ${g.prefill_tokens_per_s.toFixed(2)} tok/s, decode ${g.decode_tokens_per_s.toFixed(2)} tok/s`;
  window.lastChat = g;
  return g;
}

// What a button started, for drivers that wait on it (tools/web_screenshots.py).
window.pageBusy = Promise.resolve();
const busy = (p) => { window.pageBusy = p; return p; };

$("load-url").onclick = () => busy(loadFrom(() => fetchFolder($("url").value.trim())));
$("files").onchange = (ev) => busy(loadFrom(() => pickedFolder(ev.target.files)));
$("send").onclick = () => busy((async () => {
  $("error").textContent = "";
  if (!session) return showError("load a model first");
  try { await chat(); } catch (e) { showError(e); }
})());
$("new-chat").onclick = () => {
  $("error").textContent = "";
  if (!session) return showError("load a model first");
  try {
    session.new_chat();
    $("reply").textContent = "";
    $("chat-stats").textContent = "";
  } catch (e) { showError(e); }
};
$("verify").onclick = () => busy((async () => {
  $("error").textContent = "";
  if (!session) return showError("load a model first");
  try {
    const p = $("verify-prompt").value;
    await verify(p ? [...session.encode(p)] : []);
  } catch (e) { showError(e); }
})());

// Driven mode (tests/web.rs): ?run=a,b&base=fixtures/&broken=x,y runs each
// folder (logits, greedy ids, Verify) and POSTs what the page shows to
// /result. ?model=URL just loads that folder.
async function driven(params) {
  const base = params.get("base") || "";
  const out = { adapter: null, fixtures: {}, broken: {} };
  try {
    const g = await device();
    out.adapter = g.describe();
  } catch (e) {
    out.adapter_error = showError(e);
  }
  for (const name of (params.get("run") || "").split(",").filter(Boolean)) {
    const r = {};
    const t0 = performance.now();
    try {
      const s = await load(await fetchFolder(base + name));
      const tokens = [...s.reference_ids("reference_f32.safetensors", "tokens")];
      const want = [...s.reference_ids("reference_f32.safetensors", "generated")];
      const t1 = performance.now();
      r.logits = [...await s.logits(new Uint32Array(tokens))];
      r.greedy = [...await s.greedy(new Uint32Array(tokens), want.length)];
      const t2 = performance.now();
      const v = await verify([]);
      r.ms = { load: t1 - t0, logits_greedy: t2 - t1, verify: performance.now() - t2 };
      r.pass = v.pass;
      r.reports = v.reports.map((x) => ({
        against: x.against, pass: x.pass, first_failure: x.first_failure, rows: x.rows.length,
      }));
      r.table_text = $("verify-table").textContent;
      r.summary_text = $("verify-summary").textContent;
    } catch (e) {
      r.error = showError(e);
    }
    out.fixtures[name] = r;
  }
  for (const name of (params.get("broken") || "").split(",").filter(Boolean)) {
    $("error").textContent = "";
    try {
      await load(await fetchFolder(name));
      out.broken[name] = { loaded: true };
    } catch (e) {
      showError(e);
      out.broken[name] = { error_text: $("error").textContent };
    }
  }
  const huge = params.get("huge");
  if (huge) {
    // A context no adapter binds, typed into the page's "max context"
    // field: the memory plan's error, in the page's words.
    $("error").textContent = "";
    $("max-context").value = "4000000000";
    try {
      await load(await fetchFolder(base + huge));
      out.huge = { loaded: true };
    } catch (e) {
      showError(e);
      out.huge = { error_text: $("error").textContent };
    }
    $("max-context").value = "0";
  }
  const real = params.get("real");
  if (real) {
    // A real model (tests/web.rs's ignored test): load, one chat turn,
    // Verify on a prompt, then Verify with a porting bug injected.
    const r = {};
    try {
      await load(await fetchFolder(real));
      $("prompt").value = params.get("chat") || $("prompt").value;
      $("max-tokens").value = params.get("max_tokens") || $("max-tokens").value;
      r.chat = await chat();
      r.reply_text = $("reply").textContent;
      const ids = [...session.encode(params.get("verify_prompt") || "The capital of France is")];
      r.verify = await verify(ids);
      r.verify.table_text = $("verify-table").textContent;
      $("bug").value = params.get("bug") || "rope_interleaved";
      r.verify_bug = await verify(ids);
      r.verify_bug.summary_text = $("verify-summary").textContent;
      r.verify_bug.marked = [...$("verify-table").querySelectorAll(".first")].map((e) => e.textContent);
      $("bug").value = "none";
    } catch (e) {
      r.error = showError(e);
    }
    out.real = r;
  }
  await fetch("/result", { method: "POST", body: JSON.stringify(out) });
}

await init();
window.pageReady = true;
const params = new URLSearchParams(location.search);
if (params.has("run") || params.has("broken") || params.has("huge") || params.has("real")) {
  driven(params);
} else if (params.has("model")) {
  $("url").value = params.get("model");
  loadFrom(() => fetchFolder(params.get("model")));
}
