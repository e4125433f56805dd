#![no_main]
//! See wgllm::fuzzing::tokenizer: the same entry point tests/fuzz_corpus.rs
//! replays.
//!
//! The `tokenizers` crate panics on some malformed tokenizer.json files (one
//! is in fuzz/regressions/tokenizer/); `Tokenizer::from_json_bytes` catches
//! such a panic and returns an error naming the file. libFuzzer's panic hook
//! would abort before that catch runs, so it is replaced by a silent one: a
//! panic then unwinds to wgllm's catch, and any panic that escapes wgllm
//! still reaches libfuzzer-sys, which aborts on it (a finding).
use std::sync::Once;

static QUIET_HOOK: Once = Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    QUIET_HOOK.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    wgllm::fuzzing::tokenizer(data)
});
