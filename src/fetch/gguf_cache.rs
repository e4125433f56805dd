//! Running a `.gguf` directly. At its own types (`--dtype native`, the
//! default): [`load_gguf_native`] writes only the small files (config,
//! generation config, tokenizer) into `<cache>/<sha256>-native/` with a
//! manifest naming the GGUF (`loader::GGUF_MANIFEST`); the weights are read
//! from the GGUF itself at load, never copied. Widened (`--dtype bf16|f32`):
//! [`load_gguf_checkpoint`] converts the file
//! once into a cache folder named by the file's SHA-256 and the output dtype
//! (`<cache>/<sha256>-bf16/`, see [`default_cache_dir`]) and returns that
//! folder, which the ordinary checkpoint loader then opens. Later runs find
//! it without reading the file again while its path, size and mtime are
//! unchanged ([`file_sha256_cached`]).

use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::gguf::convert::write_json;
use crate::gguf::{convert, sha256_file, sha256_hex, ConvertDType, TokenizerWriter};

/// The default cache folder for converted GGUF files: `gguf/` under the
/// wgllm cache ([`crate::fetch::cache_root`]: `$WGLLM_CACHE`, else the older
/// `$WGLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/wgllm`, else
/// `$HOME/.cache/wgllm`).
pub fn default_cache_dir() -> Result<PathBuf> {
    Ok(crate::fetch::cache_root()?.join("gguf"))
}

/// Make a `.gguf` file runnable as a Hugging Face folder: convert it once
/// into `cache_dir/<sha256 of the file>-<dtype>/` and return that folder
/// (later calls with the same file contents return it at once; the hash
/// itself is remembered per path, size and mtime, see
/// [`file_sha256_cached`]). The conversion goes to a temporary folder renamed
/// into place when complete, so an interrupted conversion is never reused.
pub fn load_gguf_checkpoint(
    gguf_path: impl AsRef<Path>,
    cache_dir: impl AsRef<Path>,
    dtype: ConvertDType,
    tokenizer_writer: TokenizerWriter<'_>,
    progress: impl FnMut(u64, u64),
) -> Result<PathBuf> {
    let gguf_path = gguf_path.as_ref();
    let cache_dir = cache_dir.as_ref();
    let sha = file_sha256_cached(gguf_path, cache_dir)?;
    let dir = cache_dir.join(format!("{sha}-{}", dtype.name()));
    let marker = dir.join(COMPLETE_MARKER);
    if marker.is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    let tmp = cache_dir.join(format!(
        ".{sha}-{}.tmp-{}",
        dtype.name(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = (|| {
        convert(gguf_path, &tmp, dtype, tokenizer_writer, progress)?;
        write_json(
            &tmp.join(COMPLETE_MARKER),
            &json!({"source": gguf_path.to_string_lossy(), "sha256": sha, "dtype": dtype.name()}),
        )?;
        if dir.exists() {
            // An incomplete folder from an older wgllm, or a concurrent
            // conversion that just finished.
            if marker.is_file() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
                return Ok(());
            }
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| dir)
}

/// Make a `.gguf` file runnable at its own types: the folder
/// `cache_dir/<sha256>-native/` holding `config.json`,
/// `generation_config.json`, the tokenizer files and the manifest
/// `loader::GGUF_MANIFEST` that names the GGUF (its canonical path and
/// size), from which `loader::Checkpoint::open` reads the tensors in place.
/// A finished folder is reused; its manifest is rewritten when the same
/// contents are found at another path.
pub fn load_gguf_native(
    gguf_path: impl AsRef<Path>,
    cache_dir: impl AsRef<Path>,
    tokenizer_writer: TokenizerWriter<'_>,
) -> Result<PathBuf> {
    use crate::gguf::convert::{hf_generation_config, plan_tensors};
    use crate::loader::GGUF_MANIFEST;
    let gguf_path = gguf_path.as_ref();
    let cache_dir = cache_dir.as_ref();
    let sha = file_sha256_cached(gguf_path, cache_dir)?;
    let canon = std::fs::canonicalize(gguf_path).map_err(|e| Error::io(gguf_path, e))?;
    let size = std::fs::metadata(&canon)
        .map_err(|e| Error::io(&canon, e))?
        .len();
    let manifest = json!({"gguf": canon.to_string_lossy(), "size": size, "sha256": sha});
    let dir = cache_dir.join(format!("{sha}-native"));
    if dir.join(COMPLETE_MARKER).is_file() {
        let current = std::fs::read_to_string(dir.join(GGUF_MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_str::<Json>(&t).ok());
        if current.as_ref() != Some(&manifest) {
            let tmp = dir.join(format!(".{GGUF_MANIFEST}.tmp-{}", std::process::id()));
            write_json(&tmp, &manifest)?;
            let dst = dir.join(GGUF_MANIFEST);
            std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        }
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    let tmp = cache_dir.join(format!(".{sha}-native.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let g = crate::gguf::GgufFile::open(&canon)?;
        // The same checks conversion makes, so a folder made here loads.
        plan_tensors(&g)?;
        write_json(
            &tmp.join("config.json"),
            &crate::gguf::hf_config(&g, ConvertDType::F32)?,
        )?;
        write_json(
            &tmp.join("generation_config.json"),
            &hf_generation_config(&g)?,
        )?;
        tokenizer_writer(&g, &tmp)?;
        write_json(&tmp.join(GGUF_MANIFEST), &manifest)?;
        write_json(
            &tmp.join(COMPLETE_MARKER),
            &json!({"source": canon.to_string_lossy(), "sha256": sha, "dtype": "native"}),
        )?;
        if dir.exists() {
            if dir.join(COMPLETE_MARKER).is_file() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
                return Ok(());
            }
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| dir)
}

/// SHA-256 of a file, remembered in `cache_dir/by-path/` under its
/// canonical path with its size and modification time: while those are
/// unchanged the file is not read again (hashing runs at roughly 100-200
/// MB/s). The record is a convenience; failing to write it is not an error.
pub fn file_sha256_cached(path: &Path, cache_dir: &Path) -> Result<String> {
    let canon = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let meta = std::fs::metadata(&canon).map_err(|e| Error::io(&canon, e))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().to_string());
    let canon_str = canon.to_string_lossy().into_owned();
    let record = cache_dir
        .join("by-path")
        .join(format!("{}.json", sha256_hex(canon_str.as_bytes())));
    if let (Some(mtime), Ok(text)) = (&mtime_ns, std::fs::read_to_string(&record)) {
        if let Ok(r) = serde_json::from_str::<Json>(&text) {
            let sha = r["sha256"].as_str().unwrap_or("");
            if r["path"] == canon_str.as_str()
                && r["size"].as_u64() == Some(meta.len())
                && r["mtime_ns"] == mtime.as_str()
                && sha.len() == 64
            {
                return Ok(sha.to_string());
            }
        }
    }
    let sha = sha256_file(&canon)?;
    if let Some(mtime) = mtime_ns {
        let r = json!({"path": canon_str, "size": meta.len(), "mtime_ns": mtime, "sha256": sha});
        if let Some(dir) = record.parent() {
            let _ = std::fs::create_dir_all(dir).map(|_| write_json(&record, &r));
        }
    }
    Ok(sha)
}

/// The file [`load_gguf_checkpoint`] leaves in a finished cache folder.
pub const COMPLETE_MARKER: &str = "wgllm-gguf-source.json";
