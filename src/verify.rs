//! `wgllm verify`: run a model on the GPU with taps on and compare every tap
//! with the CPU reference forward and, optionally, a PyTorch dump.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::compare::{compare, RefKind, Report, Tolerances};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::loader::{Checkpoint, HostWeights, LoadDType, MemoryPlan};
use crate::model::{Faults, Model, ModelOptions};
use crate::reference::CpuModel;
use crate::taps::{read_i32, TapSet};

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
        Some(crate::tokenizer::encode_prompt(&o.model, p)?)
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
            return Err(Error::invalid(
                "give --tokens or --prompt (or a --reference dump that holds `tokens`)",
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

pub fn run(gpu: Arc<Gpu>, o: &VerifyOptions) -> Result<VerifyResult> {
    let tokens = resolve_tokens(o)?;
    let ckpt = Checkpoint::open(&o.model)?;
    let dtype = o.dtype.unwrap_or(LoadDType::Auto);
    let opts = ModelOptions {
        max_context: Some(tokens.len()),
        max_batch: tokens.len(),
        dtype,
        faults: o.faults,
        ..Default::default()
    };
    let mut model = Model::from_checkpoint(gpu.clone(), &ckpt, &opts)?;
    let got = model.forward_taps(&tokens)?;
    if let Some(d) = &o.dump {
        let mut meta = HashMap::new();
        meta.insert("source".into(), "wgllm".into());
        meta.insert("adapter".into(), gpu.name().to_string());
        meta.insert("model".into(), o.model.display().to_string());
        got.save(d, meta)?;
    }
    let mut reports = Vec::new();
    let tol_for = |kind: RefKind| -> Result<Tolerances> {
        let t = Tolerances::defaults(kind);
        match &o.tolerance_file {
            Some(f) => t.merge_file(f),
            None => Ok(t),
        }
    };
    if !o.no_cpu {
        let plan = MemoryPlan::new(&ckpt.config, &ckpt, dtype, &gpu.caps)?;
        let host = HostWeights::load(&ckpt, &plan)?;
        let mut cpu = CpuModel::new(&ckpt.config, &host, tokens.len())?;
        let want = cpu.forward(&tokens)?;
        reports.push(compare(
            &got,
            &want,
            "cpu-reference",
            RefKind::F32,
            &tol_for(RefKind::F32)?,
        ));
    }
    if let Some(r) = &o.reference {
        let kind = dump_kind(r)?;
        let want = TapSet::load(r)?;
        reports.push(compare(
            &got,
            &want,
            &r.display().to_string(),
            kind,
            &tol_for(kind)?,
        ));
    }
    let pass = !reports.is_empty() && reports.iter().all(|r| r.pass);
    Ok(VerifyResult {
        model: o.model.display().to_string(),
        adapter: gpu.name().to_string(),
        backend: format!("{:?}", gpu.adapter.info.backend),
        kernels: gpu.kernels_desc(),
        tokens,
        reports,
        pass,
    })
}
