#![no_main]
//! See wgllm::fuzzing::gguf: the same entry point tests/fuzz_corpus.rs replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| wgllm::fuzzing::gguf(data));
