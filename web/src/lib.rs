//! wgllm in the browser: the library's own loader, model, generation loop
//! and verification, on the page's WebGPU adapter, exported to JavaScript
//! with wasm-bindgen. `web/index.html` + `web/wgllm.js` are the page; this
//! file only turns JS values into the library's types and back.
//!
//! Every entry point is async: the browser cannot block, so device
//! creation, readback and generation await the library's `*_async`
//! futures, which the native build blocks on instead (one implementation).
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Array, Float32Array, Promise, Uint32Array, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use wgllm::chat::ChatTemplate;
use wgllm::compare::{RefKind, Tolerances};
use wgllm::error::{Setting, SettingNames};
use wgllm::generate::{eos_ids_from, Conversation, GenerateOptions};
use wgllm::loader::{Checkpoint, LoadDType};
use wgllm::model::{Faults, Model, ModelOptions};
use wgllm::sampling::SamplingParams;
use wgllm::taps::{read_i32_bytes, TapSet};
use wgllm::tokenizer::Tokenizer;
use wgllm::verify::{Check, VerifyResult};
use wgllm::{Gpu, GpuOptions};

fn js_err(e: impl PageText) -> JsValue {
    JsValue::from_str(&e.page_text())
}

/// The page's names for the settings a library error's hint asks to
/// change (`Error::Hint`): its form fields ("max context", "weights",
/// "max tokens"), as the CLI names its flags.
struct Fields;

impl SettingNames for Fields {
    fn name(&self, s: Setting) -> String {
        match s {
            Setting::MaxContext => "\"max context\"",
            Setting::MaxTokens => "\"max tokens\"",
            Setting::DType => "\"weights\"",
            Setting::Model => "the model folder",
            Setting::Prompt => "Verify's \"prompt\"",
            // The page has no field for these: the words for what it takes.
            Setting::Tokens => "token ids",
            Setting::Reference => "a PyTorch dump loaded with the model",
        }
        .into()
    }
}

/// An error's text as the page shows it: the library's errors with their
/// settings named by the page's fields ([`Fields`]).
trait PageText {
    fn page_text(&self) -> String;
}

impl PageText for wgllm::Error {
    fn page_text(&self) -> String {
        self.render(&Fields)
    }
}

impl PageText for String {
    fn page_text(&self) -> String {
        self.clone()
    }
}

impl PageText for &str {
    fn page_text(&self) -> String {
        self.to_string()
    }
}

impl PageText for serde_json::Error {
    fn page_text(&self) -> String {
        self.to_string()
    }
}

/// The porting bugs the page can inject into Verify's GPU run, by the
/// name its "porting bug" menu sends (all program or kernel faults: the
/// weight-transpose faults are native-only, so the page does not offer
/// them).
fn faults_named(name: &str) -> Result<Faults, JsValue> {
    let mut f = Faults::default();
    match name {
        "" | "none" => {}
        "rope_interleaved" => f.rope_interleaved = true,
        "gqa_modulo" => f.gqa_modulo = true,
        "norm_eps_outside" => f.norm_eps_outside = true,
        "drop_qkv_bias" => f.drop_qkv_bias = true,
        other => {
            return Err(js_err(format!(
                "unknown porting bug {other:?}: expected none, rope_interleaved, gqa_modulo, norm_eps_outside or drop_qkv_bias"
            )))
        }
    }
    Ok(f)
}

/// The page's adapter, as `wgllm devices` describes one: name, backend,
/// the limits the kernels use and the optional features.
#[wasm_bindgen]
pub struct WebGpu {
    gpu: Arc<Gpu>,
}

#[wasm_bindgen]
impl WebGpu {
    /// Request the browser's WebGPU adapter and a device with its limits.
    // The library shares its device as `Arc<Gpu>` (native threads need
    // that); on wasm32 wgpu's handles are not Send, and one thread uses it.
    #[allow(clippy::arc_with_non_send_sync)]
    pub async fn open() -> Result<WebGpu, JsValue> {
        let gpu = Gpu::new_async(&GpuOptions::default())
            .await
            .map_err(js_err)?;
        Ok(WebGpu { gpu: Arc::new(gpu) })
    }

    /// One line about the adapter, for the page's header.
    pub fn describe(&self) -> String {
        let g = &self.gpu;
        let i = &g.adapter.info;
        // Browsers may leave the adapter's name empty (WebGPU exposes
        // vendor, architecture and description instead).
        let name = [&i.name, &i.driver, &i.driver_info]
            .into_iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{} (vendor {:#x}, {:?}, {:?}); max storage binding {} MiB, max buffer {} MiB; shader-f16 {}, subgroups {}; kernels {}",
            if name.is_empty() { "unnamed adapter" } else { &name },
            i.vendor,
            i.device_type,
            i.backend,
            g.caps.max_binding >> 20,
            g.caps.max_buffer >> 20,
            if g.caps.shader_f16 { "yes" } else { "no" },
            if g.caps.subgroup { "yes" } else { "no" },
            g.kernels_desc()
        )
    }
}

/// A model folder's files, by name, as the page fetched or picked them.
fn files_of(names: &Array, data: &Array) -> Result<HashMap<String, Vec<u8>>, JsValue> {
    if names.length() != data.length() {
        return Err(js_err("names and data differ in length"));
    }
    let mut files = HashMap::new();
    for (n, d) in names.iter().zip(data.iter()) {
        let name = n
            .as_string()
            .ok_or_else(|| js_err("a file name is not a string"))?;
        let bytes: Uint8Array = d
            .dyn_into()
            .map_err(|_| js_err("file data is not a Uint8Array"))?;
        files.insert(name, bytes.to_vec());
    }
    Ok(files)
}

/// A loaded model: the checkpoint (kept for Verify's CPU reference), the
/// GPU model, and the tokenizer and chat template when the folder has them.
/// Its async methods return promises over a shared handle, so a call that
/// comes while another runs gets an error instead of a second borrow.
#[wasm_bindgen]
pub struct Session {
    inner: Rc<RefCell<Inner>>,
    describe: String,
}

struct Inner {
    gpu: Arc<Gpu>,
    label: PathBuf,
    ckpt: Checkpoint,
    model: Model,
    tokenizer: Option<Tokenizer>,
    chat: Option<Conversation>,
    stop_ids: Vec<u32>,
    /// Files besides the weights (reference dumps), by name.
    extra: HashMap<String, Vec<u8>>,
    /// The weights' device dtype, for Verify's own model too.
    dtype: LoadDType,
}

// The session's RefCell borrow is held across each await on purpose: it is
// the "busy" lock, so a call that comes while another is awaiting gets
// `busy`'s clear error from try_borrow_mut instead of a second borrow.
#[allow(clippy::await_holding_refcell_ref)]
#[wasm_bindgen]
impl Session {
    /// Load a model folder from its files: `config.json`, the safetensors
    /// file(s), and optionally `tokenizer.json`, `tokenizer_config.json`,
    /// `generation_config.json`, `chat_template.jinja` and reference dumps.
    /// `label` names the folder in errors (its URL). The same loader,
    /// memory plan and row splitting as native; the memory plan's error
    /// (a model that does not fit the adapter) comes back as the error,
    /// in the page's words. `max_context` 0 is the model's default;
    /// `dtype` is `auto`, `bf16` or `f32` (the page's "weights" menu).
    pub fn load(
        gpu: &WebGpu,
        label: String,
        names: Array,
        data: Array,
        max_context: usize,
        dtype: String,
    ) -> Result<Session, JsValue> {
        let label = PathBuf::from(label);
        let dtype: LoadDType = dtype.parse().map_err(|e| js_err(format!("weights: {e}")))?;
        let mut files = files_of(&names, &data)?;
        let config = files.remove("config.json").ok_or_else(|| {
            js_err(format!(
                "{}: no config.json in the model folder",
                label.display()
            ))
        })?;
        let take = |files: &mut HashMap<String, Vec<u8>>, n: &str| files.remove(n);
        let tokenizer_json = take(&mut files, "tokenizer.json");
        let gen_config = take(&mut files, "generation_config.json");
        let mut chat_files = HashMap::new();
        for n in [
            "tokenizer_config.json",
            "chat_template.jinja",
            "chat_template.json",
        ] {
            if let Some(b) = take(&mut files, n) {
                chat_files.insert(n.to_string(), b);
            }
        }
        let dumps: Vec<String> = files
            .keys()
            .filter(|n| n.starts_with("reference"))
            .cloned()
            .collect();
        let extra = dumps
            .into_iter()
            .filter_map(|n| files.remove_entry(&n))
            .collect();
        let ckpt = Checkpoint::from_memory(&label, &config, files).map_err(js_err)?;
        let opts = ModelOptions {
            max_context: (max_context > 0).then_some(max_context),
            dtype,
            ..Default::default()
        };
        let model = Model::from_checkpoint(gpu.gpu.clone(), &ckpt, &opts).map_err(js_err)?;
        let tokenizer = tokenizer_json
            .map(|b| Tokenizer::from_json_bytes(&label.join("tokenizer.json"), &b))
            .transpose()
            .map_err(js_err)?;
        let chat = if tokenizer.is_some() && !chat_files.is_empty() {
            let t = ChatTemplate::from_files(&label, &|n| Ok(chat_files.get(n).cloned()))
                .map_err(js_err)?;
            Some(Conversation::new(t, None))
        } else {
            None
        };
        let stop_ids = eos_ids_from(
            &label.join("generation_config.json"),
            gen_config.as_deref(),
            &ckpt.config.eos_token_ids,
        )
        .map_err(js_err)?;
        let inner = Inner {
            gpu: gpu.gpu.clone(),
            label,
            ckpt,
            model,
            tokenizer,
            chat,
            stop_ids,
            extra,
            dtype,
        };
        Ok(Session {
            describe: inner.describe(),
            inner: Rc::new(RefCell::new(inner)),
        })
    }

    /// What was loaded, for the page.
    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    /// Run `f` on the session as a promise of its result.
    fn run<F, Fut>(&self, f: F) -> Promise
    where
        F: FnOnce(Rc<RefCell<Inner>>) -> Fut,
        Fut: Future<Output = Result<JsValue, JsValue>> + 'static,
    {
        future_to_promise(f(self.inner.clone()))
    }

    /// The last token's logits after running `ids` from an empty cache
    /// (a promise of a Float32Array).
    pub fn logits(&self, ids: Vec<u32>) -> Promise {
        self.run(|s| async move {
            let mut s = busy(&s)?;
            let v = s.logits(ids).await?;
            Ok(Float32Array::from(&v[..]).into())
        })
    }

    /// Greedy ids after `ids` from an empty cache (a promise of a
    /// Uint32Array).
    pub fn greedy(&self, ids: Vec<u32>, n: usize) -> Promise {
        self.run(|s| async move {
            let mut s = busy(&s)?;
            let v = s.greedy(ids, n).await?;
            Ok(Uint32Array::from(&v[..]).into())
        })
    }

    /// A reference dump's integer tensor (`tokens`, `generated`) from a
    /// file loaded with the folder; empty when it has none.
    pub fn reference_ids(&self, file: &str, name: &str) -> Result<Vec<u32>, JsValue> {
        busy(&self.inner)?.reference_ids(file, name)
    }

    /// One chat turn (a promise of `wgllm run --json`'s object as text:
    /// prompt and generated ids, the reply, stop reason, prefill and
    /// decode tokens/s); each piece of text goes to `on_text` as it is
    /// produced.
    pub fn chat(&self, user: String, max_tokens: usize, on_text: js_sys::Function) -> Promise {
        self.run(|s| async move {
            let mut s = busy(&s)?;
            Ok(JsValue::from_str(&s.chat(user, max_tokens, on_text).await?))
        })
    }

    /// Verify (a promise of `wgllm verify --json`'s object as text, with
    /// the printed tables in `table`), with the porting bug named `bug`
    /// (`none`, or one of [`faults_named`]'s) injected into the GPU run.
    pub fn verify(&self, ids: Vec<u32>, bug: String) -> Promise {
        self.run(|s| async move {
            let faults = faults_named(&bug)?;
            let mut s = busy(&s)?;
            Ok(JsValue::from_str(&s.verify(ids, faults).await?))
        })
    }

    /// Encode `text` with the folder's tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        busy(&self.inner)?.encode(text)
    }

    /// Start a new conversation: the chat history and the KV cache are
    /// dropped, so the next turn prefills its whole prompt.
    pub fn new_chat(&self) -> Result<(), JsValue> {
        let mut s = busy(&self.inner)?;
        let s = &mut *s;
        if let Some(c) = s.chat.as_mut() {
            c.messages.clear();
        }
        // The conversation sees the cache no longer matches and starts over.
        s.model.reset();
        Ok(())
    }
}

fn busy(s: &Rc<RefCell<Inner>>) -> Result<std::cell::RefMut<'_, Inner>, JsValue> {
    s.try_borrow_mut()
        .map_err(|_| js_err("the model is busy with another request; wait for it to finish"))
}

impl Inner {
    fn describe(&self) -> String {
        let c = &self.ckpt.config;
        format!(
            "{:?}: {} layers, hidden {}, vocab {}; context {} tokens; tokenizer {}, chat template {}",
            c.arch,
            c.num_hidden_layers,
            c.hidden_size,
            c.vocab_size,
            self.model.max_context,
            if self.tokenizer.is_some() { "yes" } else { "no" },
            if self.chat.is_some() { "yes" } else { "no" },
        )
    }

    /// The last token's logits after running `ids` from an empty cache.
    async fn logits(&mut self, ids: Vec<u32>) -> Result<Vec<f32>, JsValue> {
        self.model.reset();
        self.model.forward_logits_async(&ids).await.map_err(js_err)
    }

    /// Greedy ids after `ids` (from an empty cache): the prompt in one
    /// pass, then one token per step through the KV cache.
    async fn greedy(&mut self, ids: Vec<u32>, n: usize) -> Result<Vec<u32>, JsValue> {
        self.model.reset();
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return Ok(out);
        }
        out.push(self.model.forward_next_async(&ids).await.map_err(js_err)?);
        while out.len() < n {
            let last = out[out.len() - 1];
            out.push(
                self.model
                    .forward_next_async(&[last])
                    .await
                    .map_err(js_err)?,
            );
        }
        Ok(out)
    }

    /// A reference dump's integer tensor (`tokens`, `generated`) from a
    /// file loaded with the folder; empty when it has none.
    fn reference_ids(&self, file: &str, name: &str) -> Result<Vec<u32>, JsValue> {
        let bytes = self
            .extra
            .get(file)
            .ok_or_else(|| js_err(format!("{file} was not loaded")))?;
        let v = read_i32_bytes(&self.label.join(file), bytes, name).map_err(js_err)?;
        Ok(v.unwrap_or_default()
            .into_iter()
            .map(|x| x as u32)
            .collect())
    }

    /// One chat turn through the model's chat template, streaming each
    /// piece of text to `on_text`; returns the generation as JSON.
    async fn chat(
        &mut self,
        user: String,
        max_tokens: usize,
        on_text: js_sys::Function,
    ) -> Result<String, JsValue> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| js_err("this model folder has no tokenizer.json"))?;
        let conv = self.chat.as_mut().ok_or_else(|| {
            js_err("this model folder has no chat template (tokenizer_config.json or chat_template.jinja)")
        })?;
        let opts = GenerateOptions {
            max_tokens,
            sampling: SamplingParams::default(),
            stop_ids: self.stop_ids.clone(),
        };
        let g = conv
            .turn_async(&mut self.model, tok, user, &opts, &|| false, |t| {
                let _ = on_text.call1(&JsValue::NULL, &JsValue::from_str(t));
            })
            .await
            .map_err(js_err)?;
        serde_json::to_string(&g).map_err(js_err)
    }

    /// Verify: every tap on the GPU against the wasm CPU reference and
    /// against each loaded PyTorch dump (`reference_*.safetensors`), on
    /// `ids`, or on the first dump's `tokens` when `ids` is empty. Returns
    /// `wgllm verify --json`'s object; `table` holds the printed tables.
    async fn verify(&mut self, ids: Vec<u32>, faults: Faults) -> Result<String, JsValue> {
        let mut references = Vec::new();
        let mut names: Vec<&String> = self.extra.keys().collect();
        names.sort();
        let mut tokens = ids;
        for n in names {
            let path = self.label.join(n);
            let bytes = &self.extra[n];
            let kind = if n.contains("bf16") {
                RefKind::Bf16
            } else if n.contains("f32") {
                RefKind::F32
            } else {
                continue;
            };
            if tokens.is_empty() {
                if let Some(t) = read_i32_bytes(&path, bytes, "tokens").map_err(js_err)? {
                    tokens = t.into_iter().map(|x| x as u32).collect();
                }
            }
            let taps = TapSet::from_bytes(&path, bytes).map_err(js_err)?;
            references.push((path.display().to_string(), kind, taps));
        }
        if tokens.is_empty() {
            return Err(js_err(
                "no tokens to verify: type a prompt, or load a reference dump that holds `tokens`",
            ));
        }
        let check = Check {
            tokens: &tokens,
            dtype: self.dtype,
            faults,
            cpu: true,
            references,
        };
        let (_, reports) = check
            .run_async(self.gpu.clone(), &self.ckpt, &|k| {
                Ok(Tolerances::defaults(k))
            })
            .await
            .map_err(js_err)?;
        let table: String = reports
            .iter()
            .map(|r| r.table())
            .collect::<Vec<_>>()
            .join("\n");
        let r = VerifyResult::new(&self.gpu, self.label.display().to_string(), tokens, reports);
        let mut v = serde_json::to_value(&r).map_err(js_err)?;
        v["table"] = serde_json::Value::String(table);
        Ok(v.to_string())
    }

    /// Encode `text` with the folder's tokenizer.
    fn encode(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| js_err("this model folder has no tokenizer.json"))?;
        tok.encode(text).map_err(js_err)
    }
}
