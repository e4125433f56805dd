#![no_main]
//! See wgllm::fuzzing::config: the same entry point tests/fuzz_corpus.rs replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| wgllm::fuzzing::config(data));
