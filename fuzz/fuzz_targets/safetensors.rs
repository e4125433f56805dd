#![no_main]
//! See wgllm::fuzzing::safetensors: the same entry point tests/fuzz_corpus.rs replays.
libfuzzer_sys::fuzz_target!(|data: &[u8]| wgllm::fuzzing::safetensors(data));
