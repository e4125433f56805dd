//! `wgllm verify`: run a model on the GPU with taps on and compare every tap
//! with the CPU reference forward and, optionally, a PyTorch dump.

#[cfg(not(target_arch = "wasm32"))]
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::compare::{compare, RefKind, Report, Tolerances};
use crate::error::Result;
#[cfg(not(target_arch = "wasm32"))]
use crate::error::{Error, Hint, Setting};
use crate::gpu::Gpu;
use crate::loader::{Checkpoint, HostWeights, LoadDType, MemoryPlan};
use crate::model::{Faults, Model, ModelOptions};
use crate::reference::CpuModel;
#[cfg(not(target_arch = "wasm32"))]
use crate::taps::read_i32;
use crate::taps::TapSet;

#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    pub model: PathBuf,
    pub tokens: Option<Vec<u32>>,
    pub prompt: Option<String>,
    pub reference: Option<PathBuf>,
    pub dump: Option<PathBuf>,
    pub tolerance_file: Option<PathBuf>,
    /// Skip the CPU reference (e.g. for very large models).
    pub no_cpu: bool,
    pub dtype: Option<LoadDType>,
    #[doc(hidden)]
    pub faults: Faults,
}

/// The outcome: one report per reference, and the tokens used.
#[derive(Debug, serde::Serialize)]
pub struct VerifyResult {
    pub model: String,
    pub adapter: String,
    /// The adapter's wgpu backend and the kernel profile in use.
    pub backend: String,
    pub kernels: String,
    pub tokens: Vec<u32>,
    pub reports: Vec<Report>,
    pub pass: bool,
}

/// Which reference a dump is, from its metadata (`dtype`), else its name.
#[cfg(not(target_arch = "wasm32"))]
fn dump_kind(path: &std::path::Path) -> Result<RefKind> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file: {e}"),
    })?;
    let dtype = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("dtype").cloned())
        .unwrap_or_default();
    let name = path.to_string_lossy().to_lowercase();
    Ok(
        if dtype.contains("bf16")
            || dtype.contains("bfloat16")
            || (dtype.is_empty() && name.contains("bf16"))
        {
            RefKind::Bf16
        } else {
            RefKind::F32
        },
    )
}

/// Resolve the tokens: `--tokens`, else `--prompt` through the folder's
/// tokenizer, else the `tokens` tensor of the reference dump. When both the
/// user and the dump give tokens they must agree.
#[cfg(not(target_arch = "wasm32"))]
fn resolve_tokens(o: &VerifyOptions) -> Result<Vec<u32>> {
    let from_ref = match &o.reference {
        Some(r) => match read_i32(r, "tokens")? {
            Some(t) => Some(
                t.iter()
                    .map(|&x| {
                        u32::try_from(x).map_err(|_| Error::Tensor {
                            path: r.clone(),
                            tensor: "tokens".into(),
                            msg: format!("token id {x} is not a valid id (expected 0..2^32)"),
                        })
                    })
                    .collect::<Result<Vec<u32>>>()?,
            ),
            None => None,
        },
        None => None,
    };
    let mine = if let Some(t) = &o.tokens {
        Some(t.clone())
    } else if let Some(p) = &o.prompt {
        let ids = crate::tokenizer::encode_prompt(&o.model, p).map_err(|e| match e {
            // Text needs the folder's tokenizer; ids do not.
            e @ Error::Io { .. } => e.hint(
                Hint::new()
                    .text("pass token ids with ")
                    .name(Setting::Tokens)
                    .text(" instead"),
            ),
            e => e,
        })?;
        Some(ids)
    } else {
        None
    };
    let tokens = match (mine, from_ref) {
        (Some(m), Some(r)) => {
            if m != r {
                return Err(Error::invalid(format!(
                    "the tokens given ({m:?}) differ from the reference dump's `tokens` ({r:?}); a comparison needs the same input"
                )));
            }
            m
        }
        (Some(m), None) => m,
        (None, Some(r)) => r,
        (None, None) => {
            return Err(Error::invalid("no input to verify").hint(
                Hint::new()
                    .text("give ")
                    .name(Setting::Tokens)
                    .text(" or ")
                    .name(Setting::Prompt)
                    .text(", or a ")
                    .name(Setting::Reference)
                    .text(" that holds `tokens`"),
            ))
        }
    };
    if tokens.is_empty() {
        return Err(Error::invalid(
            "no tokens to verify (the prompt encodes to no tokens, or the dump's `tokens` is empty)",
        ));
    }
    Ok(tokens)
}

#[cfg(not(target_arch = "wasm32"))]
pub fn run(gpu: Arc<Gpu>, o: &VerifyOptions) -> Result<VerifyResult> {
    let tokens = resolve_tokens(o)?;
    let ckpt = Checkpoint::open(&o.model)?;
    let tol_for = |kind: RefKind| -> Result<Tolerances> {
        let t = Tolerances::defaults(kind);
        match &o.tolerance_file {
            Some(f) => t.merge_file(f),
            None => Ok(t),
        }
    };
    let mut references = Vec::new();
    if let Some(r) = &o.reference {
        let kind = dump_kind(r)?;
        references.push((r.display().to_string(), kind, TapSet::load(r)?));
    }
    let check = Check {
        tokens: &tokens,
        dtype: o.dtype.unwrap_or(LoadDType::Auto),
        faults: o.faults,
        cpu: !o.no_cpu,
        references,
    };
    let (got, reports) = crate::gpu::block_on(check.run_async(gpu.clone(), &ckpt, &tol_for))?;
    if let Some(d) = &o.dump {
        let mut meta = HashMap::new();
        meta.insert("source".into(), "wgllm".into());
        meta.insert("adapter".into(), gpu.name().to_string());
        meta.insert("model".into(), o.model.display().to_string());
        got.save(d, meta)?;
    }
    Ok(VerifyResult::new(
        &gpu,
        o.model.display().to_string(),
        tokens,
        reports,
    ))
}

/// What one verification compares: the GPU's taps on `tokens` against the
/// CPU reference (when `cpu`) and against each reference dump, labelled.
/// The core of [`run`], shared with the browser build's Verify.
pub struct Check<'a> {
    pub tokens: &'a [u32],
    pub dtype: LoadDType,
    pub faults: Faults,
    pub cpu: bool,
    /// (label, kind, taps) of each PyTorch dump to compare with.
    pub references: Vec<(String, RefKind, TapSet)>,
}

impl Check<'_> {
    /// Run every tap on the GPU, then each reference; one report per
    /// reference, with `tolerances` per reference kind.
    pub async fn run_async(
        self,
        gpu: Arc<Gpu>,
        ckpt: &Checkpoint,
        tolerances: &dyn Fn(RefKind) -> Result<Tolerances>,
    ) -> Result<(TapSet, Vec<Report>)> {
        let tokens = self.tokens;
        let opts = ModelOptions {
            max_context: Some(tokens.len()),
            max_batch: tokens.len(),
            dtype: self.dtype,
            faults: self.faults,
            ..Default::default()
        };
        let mut model = Model::from_checkpoint(gpu.clone(), ckpt, &opts)?;
        let got = model.forward_taps_async(tokens).await?;
        drop(model);
        let mut reports = Vec::new();
        if self.cpu {
            let plan = MemoryPlan::new(&ckpt.config, ckpt, self.dtype, &gpu.caps)?;
            let host = HostWeights::load(ckpt, &plan)?;
            let mut cpu = CpuModel::new(&ckpt.config, &host, tokens.len())?;
            let want = cpu.forward(tokens)?;
            reports.push(compare(
                &got,
                &want,
                "cpu-reference",
                RefKind::F32,
                &tolerances(RefKind::F32)?,
            ));
        }
        for (label, kind, want) in &self.references {
            reports.push(compare(&got, want, label, *kind, &tolerances(*kind)?));
        }
        Ok((got, reports))
    }
}

impl VerifyResult {
    /// The outcome of `reports` on `gpu`; it passes when there is at least
    /// one report and every report passes.
    pub fn new(gpu: &Gpu, model: String, tokens: Vec<u32>, reports: Vec<Report>) -> Self {
        let pass = !reports.is_empty() && reports.iter().all(|r| r.pass);
        VerifyResult {
            model,
            adapter: gpu.name().to_string(),
            backend: format!("{:?}", gpu.adapter.info.backend),
            kernels: gpu.kernels_desc(),
            tokens,
            reports,
            pass,
        }
    }
}
