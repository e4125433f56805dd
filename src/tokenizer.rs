//! Tokenization through the `tokenizers` crate (Hugging Face's own Rust
//! implementation): from a model folder's `tokenizer.json`, or built from a
//! GGUF file's `tokenizer.ggml.*` metadata ([`VocabSpec`]).
//!
//! # Building from GGUF metadata
//!
//! A GGUF file stores the vocabulary, merges and token types, plus the name
//! of the pre-tokenizer llama.cpp uses (`tokenizer.ggml.pre`), but not the
//! Hugging Face pipeline itself. [`build_tokenizer`] rebuilds the pipeline of
//! the model family's UPSTREAM `tokenizer.json`, not what llama.cpp or
//! transformers' GGUF loader do (both drop steps, see below):
//!
//! | `tokenizer.ggml.pre` | normalizer | pre-tokenizer | BPE `ignore_merges` |
//! |---|---|---|---|
//! | `smollm`, `starcoder` | none | `Sequence[Digits(individual_digits), ByteLevel(use_regex)]` | false |
//! | `qwen2` | NFC | `Sequence[Split(Qwen2 regex, Isolated), ByteLevel(use_regex=false)]` | false |
//! | `llama-bpe` (Llama 3) | none | `Sequence[Split(Llama 3 regex, Isolated), ByteLevel(use_regex=false)]` | true |
//! | `gpt2`, `default`, absent | none | `ByteLevel(use_regex)` (the GPT-2 regex) | false |
//!
//! All use a byte-level BPE model without byte fallback or unknown token and a
//! ByteLevel decoder. `default`/absent is a best effort: llama.cpp writes it
//! when its converter did not recognise the tokenizer, so no upstream
//! pipeline is known; GPT-2's is the byte-level BPE baseline. Any other
//! pre-tokenizer name is an error naming the value.
//!
//! `tokenizer.ggml.model = llama` (SentencePiece: Llama 2, Mistral, Gemma)
//! is built by [`spm`] (BPE merges from the piece scores, byte fallback, `▁`
//! spaces). Any other `tokenizer.ggml.model` (`bert`, `t5`, `rwkv`, ...) is
//! an error naming the value.
//!
//! Known differences from other GGUF readers (measured, see
//! `tools/tokenizer_reference.py` and `tests/fixtures/tokenizer/`):
//! transformers' GGUF loader drops SmolLM2's `Digits` step (so `" ½"` and
//! other space + numeral pairs tokenize differently) and Qwen2's NFC
//! normalizer (so decomposed accents tokenize differently); llama.cpp skips
//! NFC as well.
//!
//! # Vocabulary layout
//!
//! Token types follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user
//! defined, 5 unused, 6 byte. The BPE model vocabulary is every token up to
//! the last normal/unknown/byte token. After it may come a block of control
//! and user-defined tokens (Qwen's `<|endoftext|>` ... `<|file_sep|>`, ids
//! 151643..=151664), which become added tokens only, and then unused filler
//! rows (Qwen's `[PAD151665]` ... `[PAD151935]`, present because the
//! embedding matrix has 151936 rows). Filler rows are NOT tokens: encoding
//! never produces them and decoding skips them (the `tokenizers` crate drops
//! ids it does not know), exactly like the upstream tokenizer of a model
//! whose embedding is padded past its vocabulary. Control and user-defined
//! tokens inside the main range (SmolLM2's ids 0..=16) stay in the model
//! vocabulary AND are added tokens, as in upstream `tokenizer.json` files.
//!
//! Added tokens: control (3) → special, user defined (4) → added but not
//! special (not skipped by `decode(skip_special_tokens)`), matched in the
//! raw text (except SentencePiece user-defined tokens without the `▁`
//! prefix, matched in the normalized text, see [`spm`]).
//! Note llama.cpp's converter marks any added token that looks like
//! `<|...|>` as control, so Qwen's `<|fim_*|>`, `<|repo_name|>` and
//! `<|file_sep|>` are control in the GGUF (special here), although upstream
//! marks them `special: false`. This only changes what
//! `decode(skip_special_tokens = true)` keeps; token ids are the same.

use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

pub mod spm;

/// Supported `tokenizer.ggml.model` values, for error messages.
pub const SUPPORTED_MODELS: &[&str] = &["gpt2", "llama"];

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Load `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Io {
                path,
                msg: "no tokenizer.json in the model folder".into(),
                source: None,
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::Io {
            msg: format!("cannot read tokenizer: {e}"),
            path: path.clone(),
            source: Some(e),
        })?;
        Self::from_json_bytes(&path, &bytes)
    }

    /// Load a `tokenizer.json` image held in memory; `path` only labels
    /// errors. Not UTF-8, not JSON or not a tokenizer the `tokenizers`
    /// crate accepts is an [`Error::Format`] naming the file; a panic inside
    /// that crate on hostile input is caught and reported the same way.
    /// (The entry point of the tokenizer fuzz target.)
    pub fn from_json_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let ferr = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ferr(format!("tokenizer file is not UTF-8: {e}")))?;
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| ferr("cannot load tokenizer: the tokenizers library panicked on this file (corrupt tokenizer.json?)".into()))?;
        let inner = parsed.map_err(|e| ferr(format!("cannot load tokenizer: {e}")))?;
        Ok(Tokenizer { inner })
    }

    /// Build from GGUF tokenizer metadata (see [`build_tokenizer`]).
    pub fn from_vocab_spec(spec: &VocabSpec) -> Result<Self> {
        Ok(Tokenizer {
            inner: build_tokenizer(spec)?,
        })
    }

    /// Token ids of `text`, without adding special tokens (the text is
    /// taken as it is; chat templates add their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::invalid(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the tokenizer's own special tokens added
    /// (e.g. a BOS where the model's tokenizer adds one), as transformers'
    /// `encode(text)` does by default; for raw (non-chat) prompts.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included. Ids the tokenizer does not
    /// know (e.g. embedding rows past the vocabulary) are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::invalid(format!("detokenizing: {e}")))
    }

    /// Text of `ids` without special tokens (what a chat UI shows).
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::invalid(format!("detokenizing: {e}")))
    }

    /// The tail of `context` that decides how text decoded after it
    /// begins: from a token that [`Tokenizer::decode_skip_special`] keeps
    /// (not special, known to the tokenizer) to the context's end. Empty
    /// when there is none: text after such a context is a text's beginning.
    ///
    /// Decoders are local to a token and its neighbours except at the very
    /// beginning of a text, where a SentencePiece decoder drops the `▁`
    /// prefix's space (`Strip`, or `Metaspace`'s first-token rule). So the
    /// text of `ids` as a continuation of `context` is the decode of
    /// `anchor ++ ids` less the decode of `anchor`; see
    /// [`crate::generate::StreamDecoder`]. The tail starts at the last kept
    /// token, or earlier when that one's text is not whole characters (a
    /// byte token ending a character: `ByteFallback` decodes a run of byte
    /// tokens together, and an invalid run as U+FFFD each), looking back at
    /// most 8 kept tokens (a character is at most 4 bytes).
    pub fn continuation_anchor<'c>(&self, context: &'c [u32]) -> Result<&'c [u32]> {
        let added = self.inner.get_added_vocabulary();
        let kept = |id: &u32| {
            self.inner
                .id_to_token(*id)
                .is_some_and(|t| !added.is_special_token(&t))
        };
        let starts: Vec<usize> = (0..context.len())
            .rev()
            .filter(|&i| kept(&context[i]))
            .take(8)
            .collect();
        let Some(&last) = starts.first() else {
            return Ok(&[]);
        };
        for &i in &starts {
            if !self
                .decode_skip_special(&context[i..])?
                .contains('\u{FFFD}')
            {
                return Ok(&context[i..]);
            }
        }
        Ok(&context[last..])
    }

    /// Text of `ids` as a continuation of `context`: the decode of
    /// `context ++ ids` less the decode of `context`, special tokens
    /// skipped (see [`Tokenizer::continuation_anchor`]). It differs from
    /// decoding `ids` alone where a `▁`-prefix SentencePiece decoder would
    /// drop a first space: after text, `▁Paris` is " Paris".
    pub fn decode_continuation(&self, context: &[u32], ids: &[u32]) -> Result<String> {
        let anchor = self.continuation_anchor(context)?;
        let anchor_text = self.decode_skip_special(anchor)?;
        self.decode_after(anchor, &anchor_text, ids)
    }

    /// [`Tokenizer::decode_continuation`] from the context's anchor and its
    /// text, known already.
    pub fn decode_after(&self, anchor: &[u32], anchor_text: &str, ids: &[u32]) -> Result<String> {
        if anchor.is_empty() {
            return self.decode_skip_special(ids);
        }
        let all: Vec<u32> = anchor.iter().chain(ids).copied().collect();
        let text = self.decode_skip_special(&all)?;
        match text.strip_prefix(anchor_text) {
            Some(rest) => Ok(rest.to_string()),
            // The context ended inside a character that `ids` complete (a
            // raw id prompt): its text has no clean end, so `ids` are
            // decoded on their own.
            None => self.decode_skip_special(ids),
        }
    }

    /// Id of a token (vocabulary entry or added token), e.g. `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (byte-level form for vocabulary entries).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of real tokens, added tokens included (can be smaller than the
    /// model's embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Convenience for `verify --prompt`.
pub fn encode_prompt(dir: &Path, text: &str) -> Result<Vec<u32>> {
    Tokenizer::from_dir(dir)?.encode(text)
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Tokenizer metadata as stored in a GGUF file (`tokenizer.ggml.*` and
/// `tokenizer.chat_template`), independent of the GGUF reader.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VocabSpec {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama`
    /// (SentencePiece, see [`spm`]).
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's pre-tokenizer name.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id (byte-level strings for
    /// vocabulary entries, raw text for added tokens).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (see [`token_type`]). When absent, every
    /// token is normal except bos/eos/padding, which are taken as control.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: "left right" pairs, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece piece scores, by id).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece's dummy prefix).
    pub add_space_prefix: Option<bool>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub padding: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl VocabSpec {
    /// Read from `g`; `None` when the file has no `tokenizer.ggml.model`.
    pub fn from_gguf(g: &crate::gguf::GgufFile) -> Result<Option<Self>> {
        let Some(model) = g.opt_str("tokenizer.ggml.model")? else {
            return Ok(None);
        };
        Ok(Some(Self {
            model: model.to_string(),
            pre: g.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens: g.get_str_array("tokenizer.ggml.tokens")?.to_vec(),
            token_types: g.opt_i32_array("tokenizer.ggml.token_type")?,
            merges: g
                .opt_str_array("tokenizer.ggml.merges")?
                .map(<[String]>::to_vec)
                .unwrap_or_default(),
            scores: g
                .opt_f32_array("tokenizer.ggml.scores")?
                .map(<[f32]>::to_vec),
            unk: g.opt_u32("tokenizer.ggml.unknown_token_id")?,
            add_space_prefix: g.opt_bool("tokenizer.ggml.add_space_prefix")?,
            bos: g.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: g.opt_u32("tokenizer.ggml.eos_token_id")?,
            padding: g.opt_u32("tokenizer.ggml.padding_token_id")?,
            add_bos: g.opt_bool("tokenizer.ggml.add_bos_token")?,
            chat_template: g.opt_str("tokenizer.chat_template")?.map(str::to_string),
        }))
    }
}

impl VocabSpec {
    /// The token string of an id, if in range.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    fn type_of(&self, id: usize) -> i32 {
        match &self.token_types {
            Some(t) => t[id],
            None => {
                let id = Some(id as u32);
                if id == self.bos || id == self.eos || id == self.padding {
                    token_type::CONTROL
                } else {
                    token_type::NORMAL
                }
            }
        }
    }
}

/// One added token of a [`VocabLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedTokenSpec {
    pub id: u32,
    pub content: String,
    pub special: bool,
}

/// How a [`VocabSpec`]'s ids map onto the tokenizer (see the module docs).
#[derive(Debug, Clone)]
pub struct VocabLayout {
    /// Ids `0..model_tokens` are the BPE model's vocabulary.
    pub model_tokens: usize,
    /// Ids `0..real_tokens` are tokens; ids from `real_tokens` up to the
    /// number of GGUF entries are unused filler rows, not tokens.
    pub real_tokens: usize,
    /// Control and user-defined tokens, ascending ids.
    pub added: Vec<AddedTokenSpec>,
}

/// The pipeline family of a pre-tokenizer name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2's ByteLevel with its built-in regex (`gpt2`, `default`, absent).
    Gpt2,
    /// Digits split individually, then GPT-2 ByteLevel (`smollm`, `starcoder`).
    DigitsGpt2,
    /// NFC, Qwen2 split regex, ByteLevel without regex (`qwen2`).
    Qwen2,
    /// Llama 3 split regex, ByteLevel without regex, ignore_merges (`llama-bpe`).
    Llama3,
}

/// Supported `tokenizer.ggml.pre` values, for error messages.
pub const SUPPORTED_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "qwen2",
    "llama-bpe",
    "gpt2",
    "default",
];

/// The Qwen2 pre-tokenizer regex (upstream tokenizer.json `Split` pattern):
/// single digits, letters with one optional leading non-letter, punctuation
/// runs, newline runs, whitespace.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Llama 3 pre-tokenizer regex: like Qwen2's but digits in groups of 1..=3.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Map llama.cpp's pre-tokenizer name to a pipeline family.
pub fn pre_tokenizer_kind(pre: Option<&str>) -> Result<PreTokenizerKind> {
    Ok(match pre {
        None | Some("default") | Some("gpt2") | Some("gpt-2") => PreTokenizerKind::Gpt2,
        Some("smollm") | Some("starcoder") => PreTokenizerKind::DigitsGpt2,
        Some("qwen2") => PreTokenizerKind::Qwen2,
        Some("llama-bpe") | Some("llama3") | Some("llama-v3") => PreTokenizerKind::Llama3,
        Some(other) => {
            return Err(Error::invalid(format!(
                "unsupported tokenizer.ggml.pre `{other}`: no known Hugging Face pipeline for it \
                 (supported: {})",
                SUPPORTED_PRE.join(", ")
            )))
        }
    })
}

/// Check a [`VocabSpec`] and work out its id layout (see the module docs).
pub fn vocab_layout(spec: &VocabSpec) -> Result<VocabLayout> {
    use token_type::*;
    if !SUPPORTED_MODELS.contains(&spec.model.as_str()) {
        return Err(Error::invalid(format!(
            "unsupported tokenizer.ggml.model `{}`: only `gpt2` (byte-level BPE) and `llama` \
             (SentencePiece) vocabularies can be built",
            spec.model
        )));
    }
    let n = spec.tokens.len();
    if n == 0 {
        return Err(Error::invalid("tokenizer.ggml.tokens is empty"));
    }
    if let Some(t) = &spec.token_types {
        if t.len() != n {
            return Err(Error::invalid(format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
                t.len()
            )));
        }
        if let Some((i, bad)) = t.iter().enumerate().find(|(_, &x)| !(1..=6).contains(&x)) {
            return Err(Error::invalid(format!(
                "token {i}: unknown token type {bad} (llama.cpp types are 1..=6)"
            )));
        }
    }
    for (what, id) in [
        ("bos", spec.bos),
        ("eos", spec.eos),
        ("padding", spec.padding),
    ] {
        if let Some(id) = id {
            if id as usize >= n {
                return Err(Error::invalid(format!(
                    "tokenizer.ggml.{what}_token_id {id} is past the {n} tokens"
                )));
            }
        }
    }
    let is_model_type = |t: i32| matches!(t, NORMAL | UNKNOWN | BYTE);
    let model_tokens = (0..n)
        .rev()
        .find(|&i| is_model_type(spec.type_of(i)))
        .map_or(0, |i| i + 1);
    let mut added = Vec::new();
    let mut real_tokens = model_tokens;
    let mut first_unused_tail: Option<usize> = None;
    for i in 0..n {
        let t = spec.type_of(i);
        if i >= model_tokens && t == UNUSED {
            first_unused_tail.get_or_insert(i);
            continue;
        }
        // SentencePiece's unknown token (`<unk>`) is a special added token
        // too, as in the upstream Llama tokenizer.json: `<unk>` in text is
        // its id, and decoding without specials drops it.
        let spm_unk = spec.model == "llama" && t == UNKNOWN;
        if t == CONTROL || t == USER_DEFINED || spm_unk {
            if i >= model_tokens {
                if let Some(u) = first_unused_tail {
                    return Err(Error::invalid(format!(
                        "token {i} `{}` (type {t}) comes after unused token {u} `{}`: added \
                         tokens past the vocabulary must be contiguous, or their ids would shift",
                        spec.tokens[i], spec.tokens[u]
                    )));
                }
                real_tokens = i + 1;
            }
            if spec.tokens[i].is_empty() {
                return Err(Error::invalid(format!("token {i} (type {t}) is empty")));
            }
            added.push(AddedTokenSpec {
                id: i as u32,
                content: spec.tokens[i].clone(),
                special: t != USER_DEFINED,
            });
        }
    }
    Ok(VocabLayout {
        model_tokens,
        real_tokens,
        added,
    })
}

fn tok_err(what: &str) -> impl FnOnce(tokenizers::Error) -> Error + '_ {
    move |e| Error::invalid(format!("building the tokenizer ({what}): {e}"))
}

/// Build the upstream Hugging Face tokenizer pipeline from GGUF metadata
/// (see the module docs for the pipelines and the id layout).
pub fn build_tokenizer(spec: &VocabSpec) -> Result<tokenizers::Tokenizer> {
    let layout = vocab_layout(spec)?;
    if spec.model == "llama" {
        let (bpe, normalizer, decoder) =
            spm::model_parts(spec, &layout, model_vocab(spec, &layout)?)?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_normalizer(Some(normalizer));
        tok.with_decoder(Some(decoder));
        return finish(tok, spec, &layout, None);
    }
    let kind = pre_tokenizer_kind(spec.pre.as_deref())?;
    let vocab = model_vocab(spec, &layout)?;
    let mut merges = Vec::with_capacity(spec.merges.len());
    for (i, m) in spec.merges.iter().enumerate() {
        match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(Error::invalid(format!(
                    "merge {i} `{m}` is not two tokens separated by one space"
                )))
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(false)
        .byte_fallback(false)
        .ignore_merges(kind == PreTokenizerKind::Llama3)
        .build()
        .map_err(tok_err("BPE model"))?;

    let mut tok = tokenizers::Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err("split regex"))?
        .into())
    };
    // ByteLevel(add_prefix_space, trim_offsets, use_regex), as upstream.
    let (pre, post, decoder): (PreTokenizerWrapper, ByteLevel, ByteLevelDecoder) = match kind {
        PreTokenizerKind::Gpt2 => (
            ByteLevel::new(false, true, true).into(),
            ByteLevel::new(false, true, true),
            ByteLevel::new(false, true, true),
        ),
        PreTokenizerKind::DigitsGpt2 => (
            PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            ByteLevel::new(true, false, true),
            ByteLevel::new(true, true, true),
        ),
        PreTokenizerKind::Qwen2 => (
            PreSequence::new(vec![
                split(QWEN2_REGEX)?,
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
            ByteLevel::new(false, false, false),
            ByteLevel::new(false, false, false),
        ),
        PreTokenizerKind::Llama3 => (
            PreSequence::new(vec![
                split(LLAMA3_REGEX)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            ByteLevel::new(true, false, true),
            ByteLevel::new(true, true, true),
        ),
    };
    if kind == PreTokenizerKind::Qwen2 {
        tok.with_normalizer(Some(NFC));
    }
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(decoder));
    finish(tok, spec, &layout, Some(post.into()))
}

/// The model range's pieces as a BPE vocabulary (duplicates are an error).
fn model_vocab(spec: &VocabSpec, layout: &VocabLayout) -> Result<Vocab> {
    let mut vocab: Vocab = Vocab::default();
    vocab.reserve(layout.model_tokens);
    for (i, t) in spec.tokens[..layout.model_tokens].iter().enumerate() {
        if let Some(prev) = vocab.insert(t.clone(), i as u32) {
            return Err(Error::invalid(format!(
                "token `{t}` appears twice in the vocabulary (ids {prev} and {i})"
            )));
        }
    }
    Ok(vocab)
}

/// Whether an added token is matched in the normalized text (true only for
/// SentencePiece user-defined tokens without the `▁` prefix, see
/// [`spm::user_defined_normalized`]) rather than in the raw text.
fn added_normalized(spec: &VocabSpec, a: &AddedTokenSpec) -> bool {
    spec.model == "llama" && !a.special && spm::user_defined_normalized(spec)
}

/// The BOS post-processor (after `post`, if any) and the added tokens, with
/// the id checks; shared by the byte-level and SentencePiece pipelines.
fn finish(
    mut tok: tokenizers::Tokenizer,
    spec: &VocabSpec,
    layout: &VocabLayout,
    post: Option<PostProcessorWrapper>,
) -> Result<tokenizers::Tokenizer> {
    // BOS is added by the post-processor only when the GGUF asks for it.
    let bos = match (spec.add_bos, spec.bos) {
        (Some(true), Some(id)) => Some((spec.tokens[id as usize].clone(), id)),
        (Some(true), None) => {
            return Err(Error::invalid(
                "tokenizer.ggml.add_bos_token is true but there is no bos_token_id",
            ))
        }
        _ => None,
    };
    let post: Option<PostProcessorWrapper> = match bos {
        None => post,
        Some((bos, id)) => {
            let template = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos}:1 $B:1")))
                .map_err(|e| Error::invalid(format!("bos template: {e}")))?
                .special_tokens(vec![(bos.clone(), id)])
                .build()
                .map_err(|e| Error::invalid(format!("bos template: {e}")))?;
            Some(match post {
                Some(post) => PostSequence::new(vec![post, template.into()]).into(),
                None => template.into(),
            })
        }
    };
    if let Some(post) = post {
        tok.with_post_processor(Some(post));
    }

    let added: Vec<AddedToken> = layout
        .added
        .iter()
        .map(|a| {
            AddedToken::from(a.content.clone(), a.special).normalized(added_normalized(spec, a))
        })
        .collect();
    tok.add_tokens(&added);

    // The crate assigns ids to added tokens outside the model vocabulary in
    // insertion order; make sure every id came out as in the GGUF.
    for a in &layout.added {
        let got = tok.token_to_id(&a.content);
        if got != Some(a.id) {
            return Err(Error::invalid(format!(
                "added token `{}` got id {got:?} instead of {} (duplicate of another token?)",
                a.content, a.id
            )));
        }
    }
    if tok.get_vocab_size(true) != layout.real_tokens {
        return Err(Error::invalid(format!(
            "tokenizer has {} tokens, expected {} (duplicate token strings?)",
            tok.get_vocab_size(true),
            layout.real_tokens
        )));
    }
    Ok(tok)
}

/// A token string for tokenizer_config.json (`null` when absent).
fn token_json(spec: &VocabSpec, id: Option<u32>) -> serde_json::Value {
    match id.and_then(|id| spec.token(id)) {
        Some(t) => serde_json::Value::String(t.to_string()),
        None => serde_json::Value::Null,
    }
}

/// Write `tokenizer.json` (the `tokenizers` crate's own serialization of
/// [`build_tokenizer`]'s result) and `tokenizer_config.json` (special tokens,
/// `added_tokens_decoder`, `add_bos_token`, `chat_template`) into `out_dir`,
/// so that `transformers.AutoTokenizer.from_pretrained(out_dir)` and
/// [`Tokenizer::from_dir`] load the same tokenizer.
pub fn write_tokenizer_files(spec: &VocabSpec, out_dir: &Path) -> Result<()> {
    let tok = build_tokenizer(spec)?;
    let layout = vocab_layout(spec)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    let path = out_dir.join("tokenizer.json");
    let json = tok
        .to_string(true)
        .map_err(|e| Error::invalid(format!("serializing tokenizer.json: {e}")))?;
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;

    // Ids as strings, in ascending numeric order (BTreeMap<u32>, then
    // inserted into a serde_json map in that order).
    let decoder: BTreeMap<u32, serde_json::Value> = layout
        .added
        .iter()
        .map(|a| {
            (
                a.id,
                serde_json::json!({
                    "content": a.content,
                    "lstrip": false,
                    "normalized": added_normalized(spec, a),
                    "rstrip": false,
                    "single_word": false,
                    "special": a.special,
                }),
            )
        })
        .collect();
    let mut decoder_json = serde_json::Map::new();
    for (id, v) in decoder {
        decoder_json.insert(id.to_string(), v);
    }
    // SentencePiece has an unknown token; the byte-level pipelines none.
    let unk_token = match spec.model.as_str() {
        "llama" => token_json(spec, spm::unk_id(spec)),
        _ => serde_json::Value::Null,
    };
    let mut config = serde_json::json!({
        "add_bos_token": spec.add_bos.unwrap_or(false),
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder_json,
        "bos_token": token_json(spec, spec.bos),
        "eos_token": token_json(spec, spec.eos),
        "pad_token": token_json(spec, spec.padding),
        "unk_token": unk_token,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if spec.model == "llama" {
        // No pre-tokenizer to add a prefix space to: the `▁` prefix is the
        // normalizer's `Prepend` (spm module docs).
        config.as_object_mut().map(|c| c.remove("add_prefix_space"));
    }
    if let Some(t) = &spec.chat_template {
        config["chat_template"] = serde_json::Value::String(t.clone());
    }
    let path = out_dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::invalid(format!("serializing tokenizer_config.json: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level vocabulary: the 256 byte symbols, a few merges and
    /// optional added tokens after them.
    fn tiny_spec(pre: &str, extra: &[(&str, i32)]) -> VocabSpec {
        let mut tokens: Vec<String> = (0u8..=255).map(byte_symbol).collect();
        let mut types = vec![token_type::NORMAL; 256];
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"];
        for m in merges {
            let (a, b) = m.split_once(' ').unwrap();
            tokens.push(format!("{a}{b}"));
            types.push(token_type::NORMAL);
        }
        for (t, ty) in extra {
            tokens.push(t.to_string());
            types.push(*ty);
        }
        VocabSpec {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types: Some(types),
            merges: merges.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// GPT-2's byte-to-unicode map, written out independently of the crate.
    fn byte_symbol(b: u8) -> String {
        let printable =
            |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        if printable(b) {
            char::from_u32(b as u32).unwrap().to_string()
        } else {
            let n = (0u8..b).filter(|&x| !printable(x)).count() as u32;
            char::from_u32(256 + n).unwrap().to_string()
        }
    }

    #[test]
    fn byte_symbol_matches_gpt2() {
        assert_eq!(byte_symbol(b' '), "Ġ");
        assert_eq!(byte_symbol(b'\n'), "Ċ");
        assert_eq!(byte_symbol(b'a'), "a");
    }

    #[test]
    fn layout_drops_unused_tail_and_keeps_ids() {
        let spec = tiny_spec(
            "qwen2",
            &[
                ("<|s|>", token_type::CONTROL),
                ("<u>", token_type::USER_DEFINED),
                ("[PAD1]", token_type::UNUSED),
                ("[PAD2]", token_type::UNUSED),
            ],
        );
        let l = vocab_layout(&spec).unwrap();
        assert_eq!(l.model_tokens, 262);
        assert_eq!(l.real_tokens, 264);
        assert_eq!(l.added.len(), 2);
        let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
        assert_eq!(tok.vocab_size(), 264);
        assert_eq!(
            tok.encode("hello<|s|> w<u>").unwrap(),
            vec![259, 262, 260, 263]
        );
        // Filler ids are not tokens: they decode to nothing.
        assert_eq!(tok.decode(&[259, 264, 265]).unwrap(), "hello");
        // Control tokens are special, user-defined ones are not.
        assert_eq!(tok.decode_skip_special(&[262, 263]).unwrap(), "<u>");
    }

    #[test]
    fn digits_pipeline_splits_digits() {
        let spec = tiny_spec("smollm", &[]);
        let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
        // "12" is in the vocabulary, but smollm splits digits first.
        assert_eq!(tok.encode("12").unwrap(), vec![b'1' as u32, b'2' as u32]);
        let gpt2 = Tokenizer::from_vocab_spec(&tiny_spec("gpt2", &[])).unwrap();
        assert_eq!(gpt2.encode("12").unwrap(), vec![261]);
    }

    #[test]
    fn qwen2_pipeline_normalizes_nfc() {
        let mut spec = tiny_spec("qwen2", &[]);
        spec.tokens.push("Ã©".into()); // "é" (U+00E9) as byte-level UTF-8
        spec.token_types.as_mut().unwrap().push(token_type::NORMAL);
        spec.merges.push("Ã ©".into());
        let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
        let id = 262;
        assert_eq!(tok.encode("\u{e9}").unwrap(), vec![id]);
        assert_eq!(tok.encode("e\u{301}").unwrap(), vec![id]);
        let gpt2 = Tokenizer::from_vocab_spec(&VocabSpec {
            pre: Some("gpt2".into()),
            ..spec
        })
        .unwrap();
        assert_ne!(gpt2.encode("e\u{301}").unwrap(), vec![id]);
    }

    #[test]
    fn add_bos_uses_post_processor() {
        let mut spec = tiny_spec("llama-bpe", &[("<s>", token_type::CONTROL)]);
        spec.bos = Some(262);
        spec.add_bos = Some(true);
        let tok = build_tokenizer(&spec).unwrap();
        let with = tok.encode("hello", true).unwrap();
        assert_eq!(with.get_ids(), &[262, 259]);
        let without = tok.encode("hello", false).unwrap();
        assert_eq!(without.get_ids(), &[259]);
    }

    #[test]
    fn clear_errors() {
        let mut spec = tiny_spec("qwen2", &[]);
        spec.model = "bert".into();
        let e = build_tokenizer(&spec).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.ggml.model `bert`") && e.contains("llama"),
            "{e}"
        );

        let spec = tiny_spec("deepseek-llm", &[]);
        let e = build_tokenizer(&spec).unwrap_err().to_string();
        assert!(e.contains("`deepseek-llm`") && e.contains("qwen2"), "{e}");

        let mut spec = tiny_spec("qwen2", &[]);
        spec.merges.push("nospace".into());
        let e = build_tokenizer(&spec).unwrap_err().to_string();
        assert!(e.contains("merge 6 `nospace`"), "{e}");

        let spec = tiny_spec(
            "qwen2",
            &[
                ("[PAD]", token_type::UNUSED),
                ("<|x|>", token_type::CONTROL),
            ],
        );
        let e = build_tokenizer(&spec).unwrap_err().to_string();
        assert!(e.contains("contiguous"), "{e}");

        let mut spec = tiny_spec("qwen2", &[]);
        spec.tokens[260] = "a".into(); // duplicate of byte 'a' (id 97)
        let e = build_tokenizer(&spec).unwrap_err().to_string();
        assert!(e.contains("appears twice"), "{e}");
    }
}
