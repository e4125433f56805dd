//! SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2,
//! Mistral, Gemma, ...) as a `tokenizers` pipeline.
//!
//! llama.cpp encodes these with SentencePiece's BPE algorithm: split the
//! text into characters, then repeatedly merge the adjacent pair whose
//! concatenation is a vocabulary piece with the highest score, then spell
//! what is not a piece as `<0xNN>` byte tokens. A `tokenizers` BPE model does
//! the same when its merge list holds, for every normal piece, each split
//! into two normal pieces, ranked by the piece's score (what transformers'
//! SentencePiece converter does too). The only difference: SentencePiece
//! breaks a tie between two pairs that make the SAME piece by position, a
//! merge list by rank (measured: no difference on the fixture cases, see
//! `tools/make_spm_fixture.py`).
//!
//! | step | pipeline |
//! |---|---|
//! | normalizer | `Prepend("▁")` when `tokenizer.ggml.add_space_prefix` (default true, as llama.cpp), then `Replace(" ", "▁")`; no other normalization (llama.cpp does none) |
//! | pre-tokenizer | none: each text segment is one word |
//! | model | BPE, merges from scores (into normal and user-defined pieces), `byte_fallback` when the vocabulary has byte tokens, unknown token `tokenizer.ggml.unknown_token_id` (else the first type-2 token), unknowns fused |
//! | decoder | `Replace("▁", " ")`, `ByteFallback`, `Fuse`, then `Strip(" ", 1, 0)` (the prefix space) when the prefix is added |
//!
//! Control tokens (special) are matched in the raw text first; the
//! normalizer then runs on each piece of text between them, so each gets its
//! own `▁` prefix. That is llama.cpp's rule and the upstream `tokenizer.json`
//! of Llama 2 and Mistral (the "legacy" Llama tokenizer), and how their
//! prompts were built (BOS, then the text encoded with its dummy prefix).
//! SentencePiece itself never matches control tokens in text.
//!
//! User-defined tokens (not special): SentencePiece matches them in the
//! normalized text (longest match first), so a user-defined `▁▁▁▁` (Gemma
//! style whitespace runs) takes four spaces. Without the prefix they are
//! normalized added tokens, which is exactly that. With the prefix the
//! crate cannot do it (it would normalize `<tool>` itself to `▁<tool>`):
//! they are matched in the raw text like control tokens (llama.cpp's rule:
//! `a<tool>b` is `▁a <tool> ▁b` where SentencePiece gives `▁a <tool> b`),
//! and whitespace ones are reached through the merges, as in llama.cpp
//! (agrees with SentencePiece on every fixture case).
//!
//! `tokenizer.ggml.model = llama` does not say which SentencePiece algorithm
//! trained the vocabulary; a Unigram-trained vocabulary is encoded the same
//! way (as llama.cpp does), which is not SentencePiece's Viterbi search
//! (the fixture's Unigram model agrees on most cases, not all; see
//! `tests/tokenizer.rs`). `tokenizer.ggml.pre` is ignored for these
//! vocabularies, as llama.cpp does.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::NormalizerWrapper;

use super::{tok_err, token_type, VocabLayout, VocabSpec};
use crate::error::{Error, Result};

/// SentencePiece's space symbol, U+2581 LOWER ONE EIGHTH BLOCK.
pub const SPACE: &str = "\u{2581}";

/// Longest normal piece (bytes) merges are derived for. SentencePiece's
/// trainer caps pieces at 512 characters (`max_sentencepiece_length`); the
/// splits of a piece cost its length squared, so a forged file with one huge
/// token is refused instead of taking hours.
pub const MAX_PIECE_BYTES: usize = 2048;

/// Whether the vocabulary's text gets the `▁` prefix
/// (`tokenizer.ggml.add_space_prefix`, llama.cpp's default true).
pub fn add_space_prefix(spec: &VocabSpec) -> bool {
    spec.add_space_prefix.unwrap_or(true)
}

/// Whether user-defined tokens are matched in the normalized text (spaces
/// as `▁`), as SentencePiece matches them: only without the `▁` prefix. The
/// `tokenizers` crate normalizes a normalized added token's own text to
/// find it, and the `Prepend` normalizer would turn `<tool>` into
/// `▁<tool>`; with the prefix they are matched in the raw text instead, as
/// llama.cpp does (module docs).
pub fn user_defined_normalized(spec: &VocabSpec) -> bool {
    !add_space_prefix(spec)
}

/// The unknown token: `tokenizer.ggml.unknown_token_id`, else the first
/// token of type unknown.
pub fn unk_id(spec: &VocabSpec) -> Option<u32> {
    spec.unk.or_else(|| {
        (0..spec.tokens.len())
            .find(|&i| spec.type_of(i) == token_type::UNKNOWN)
            .map(|i| i as u32)
    })
}

/// The BPE merges of a SentencePiece vocabulary: for each normal or
/// user-defined piece (in the model range), every split into two such
/// pieces, ordered by the piece's score (highest first), then by id, then
/// longer left part first. llama.cpp merges into any piece; control,
/// unknown and byte pieces cannot be spelled by characters anyway
/// (`<s>`, `<0x0A>`), and SentencePiece never merges into unused ones.
pub fn derive_merges(
    spec: &VocabSpec,
    layout: &VocabLayout,
    vocab: &Vocab,
) -> Result<Vec<(String, String)>> {
    let scores = spec.scores.as_deref().ok_or_else(|| {
        Error::invalid(
            "tokenizer.ggml.scores is missing: a SentencePiece (`llama`) vocabulary needs the \
             piece scores to order its merges",
        )
    })?;
    if scores.len() != spec.tokens.len() {
        return Err(Error::invalid(format!(
            "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {}",
            scores.len(),
            spec.tokens.len()
        )));
    }
    let mergeable = |t: i32| t == token_type::NORMAL || t == token_type::USER_DEFINED;
    let in_merges = |t: &str| {
        vocab
            .get(t)
            .is_some_and(|&id| mergeable(spec.type_of(id as usize)))
    };
    // (score, id, left length in bytes, left, right)
    let mut found: Vec<(f32, u32, usize, &str, &str)> = Vec::new();
    let pieces = spec.tokens.iter().zip(scores).take(layout.model_tokens);
    for (id, (piece, &score)) in pieces.enumerate() {
        if !mergeable(spec.type_of(id)) {
            continue;
        }
        if piece.len() > MAX_PIECE_BYTES {
            return Err(Error::invalid(format!(
                "token {id} is a piece of {} bytes; SentencePiece pieces are at most 512 \
                 characters (limit {MAX_PIECE_BYTES} bytes)",
                piece.len()
            )));
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if in_merges(l) && in_merges(r) {
                found.push((score, id as u32, l.len(), l, r));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
    Ok(found
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect())
}

/// The BPE model, normalizer and decoder of a SentencePiece vocabulary
/// (see the module docs); `vocab` is the model range's pieces.
pub fn model_parts(
    spec: &VocabSpec,
    layout: &VocabLayout,
    vocab: Vocab,
) -> Result<(BPE, NormalizerWrapper, DecoderWrapper)> {
    let merges = derive_merges(spec, layout, &vocab)?;
    let unk = unk_id(spec).ok_or_else(|| {
        Error::invalid(
            "a SentencePiece (`llama`) vocabulary needs an unknown token \
             (tokenizer.ggml.unknown_token_id, or a token of type 2)",
        )
    })?;
    if unk as usize >= layout.model_tokens {
        return Err(Error::invalid(format!(
            "tokenizer.ggml.unknown_token_id {unk} is not in the vocabulary's {} pieces",
            layout.model_tokens
        )));
    }
    let byte_fallback = (0..layout.model_tokens).any(|i| spec.type_of(i) == token_type::BYTE);
    if byte_fallback {
        for i in (0..layout.model_tokens).filter(|&i| spec.type_of(i) == token_type::BYTE) {
            let t = &spec.tokens[i];
            let ok = t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].chars().all(|c| c.is_ascii_hexdigit());
            if !ok {
                return Err(Error::invalid(format!(
                    "token {i} `{t}` has the byte type (6) but is not of the form <0xNN>"
                )));
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(spec.tokens[unk as usize].clone())
        .fuse_unk(true)
        .byte_fallback(byte_fallback)
        .build()
        .map_err(tok_err("SentencePiece BPE model"))?;

    let prefix = add_space_prefix(spec);
    let replace =
        |from: &str, to: &str| Replace::new(from, to).map_err(tok_err("space replacement"));
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        norms.push(Prepend::new(SPACE.to_string()).into());
    }
    norms.push(replace(" ", SPACE)?.into());
    let normalizer = NormSequence::new(norms).into();

    let mut decoders: Vec<DecoderWrapper> = vec![
        replace(SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let decoder = DecoderSequence::new(decoders).into();
    Ok((bpe, normalizer, decoder))
}

#[cfg(test)]
mod tests {
    use super::super::Tokenizer;
    use super::*;

    /// ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3..=5 byte tokens `<0x0A>`
    /// `<0xC3>` `<0xA9>`, then normal pieces 6 `▁a`, 7 `ab`, 8 `▁`, 9 `a`,
    /// 10 `b` with BPE-style scores (earlier merge, higher score).
    fn tiny() -> VocabSpec {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>"]
            .map(String::from)
            .to_vec();
        let mut types = vec![2, 3, 3, 6, 6, 6];
        let mut scores = vec![0.0; 6];
        for (i, p) in ["\u{2581}a", "ab", "\u{2581}", "a", "b"].iter().enumerate() {
            tokens.push(p.to_string());
            types.push(token_type::NORMAL);
            scores.push(-(i as f32));
        }
        VocabSpec {
            model: "llama".into(),
            tokens,
            token_types: Some(types),
            scores: Some(scores),
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn merges_follow_scores() {
        let spec = tiny();
        let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
        // "ab" is "▁ab": ▁+a (score 0) beats a+b (score -1).
        assert_eq!(tok.encode("ab").unwrap(), vec![6, 10]);
        // Swap the two scores: a+b merges first.
        let mut swapped = spec.clone();
        swapped.scores.as_mut().unwrap().swap(6, 7);
        let tok2 = Tokenizer::from_vocab_spec(&swapped).unwrap();
        assert_eq!(tok2.encode("ab").unwrap(), vec![8, 7]);
    }

    #[test]
    fn spaces_bytes_unknowns_and_bos() {
        let tok = Tokenizer::from_vocab_spec(&tiny()).unwrap();
        // Every space is a ▁, the first one added; é is two byte tokens,
        // the newline one; "zz" (no byte tokens for z) one fused unknown.
        assert_eq!(tok.encode(" a\u{e9}\n").unwrap(), vec![8, 6, 4, 5, 3]);
        assert_eq!(tok.encode("azz").unwrap(), vec![6, 0]);
        // <unk> is a special token: matched in text, dropped when skipping.
        assert_eq!(tok.encode("<unk>").unwrap(), vec![0]);
        assert_eq!(tok.decode_skip_special(&[6, 0]).unwrap(), "a");
        assert_eq!(tok.decode(&[8, 6, 4, 5, 3]).unwrap(), " a\u{e9}\n");
        assert_eq!(tok.encode_with_special("ab").unwrap(), vec![1, 6, 10]);
        assert_eq!(tok.decode_skip_special(&[1, 6, 10]).unwrap(), "ab");
        // Without the dummy prefix: no ▁ in front, no space stripped.
        let spec = VocabSpec {
            add_space_prefix: Some(false),
            ..tiny()
        };
        let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
        assert_eq!(tok.encode("ab").unwrap(), vec![7]);
        assert_eq!(tok.decode(&[6]).unwrap(), " a");
    }

    #[test]
    fn huge_piece_is_refused() {
        let mut spec = tiny();
        spec.tokens[9] = "a".repeat(MAX_PIECE_BYTES + 1);
        let e = super::super::build_tokenizer(&spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token 9") && e.contains("bytes"), "{e}");
    }
}
