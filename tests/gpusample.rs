//! Generation on the GPU-fed paths (`generate` with greedy decoding runs
//! `Model::decode_greedy_checked`: the argmax feeds the next step on the
//! GPU and reports each step's logits' finiteness with its id), held to an
//! independent host loop that reads back every step's logits: the same ids,
//! the same KV position afterwards, and the same error at the same step when
//! the logits stop being finite.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{fixture, gpu};
use wgllm::generate::{check_logits, generate, GenerateOptions};
use wgllm::model::{Model, ModelOptions};
use wgllm::tokenizer::Tokenizer;

/// A byte-level tokenizer for the fixtures' 512-token vocabularies, only so
/// that `generate` can stream text.
fn tokenizer() -> Tokenizer {
    common::byte_level_tokenizer()
}

fn prompt(name: &str) -> Vec<u32> {
    common::prompt_json_tokens(name)
}

/// A copy of fixture `name` with every lm_head weight multiplied by `scale`
/// (rounded to bf16 and kept finite), so that its logits overflow f32 for
/// some hidden states and not for others.
fn scaled_head(name: &str, scale: f32, out: &Path) {
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(fixture(name).join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let head = tensors
        .iter_mut()
        .find(|t| t.0 == "lm_head.weight")
        .expect("an untied fixture");
    assert_eq!(head.1, safetensors::Dtype::BF16);
    for c in head.3.chunks_exact_mut(2) {
        let w = half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * scale;
        let b = half::bf16::from_f32(w.clamp(-f32::MAX, f32::MAX));
        let b = if b.is_infinite() {
            half::bf16::MAX.copysign(b)
        } else {
            b
        };
        c.copy_from_slice(&b.to_le_bytes());
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

/// The tests of this file one at a time: they all drive the one shared
/// device hard, and under the GL backend a thread that waits more than
/// wgpu's 6 s for the GL context (held by another test's submissions on a
/// loaded machine) panics.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn load(dir: &Path) -> Model {
    let opts = ModelOptions {
        max_context: Some(64),
        ..Default::default()
    };
    Model::load(gpu(), dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The reference loop: every step's logits read back, checked on the host,
/// host argmax; `max_tokens` passes, no stop ids.
fn host_greedy(m: &mut Model, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    let mut input = prompt.to_vec();
    for step in 0..max_tokens {
        let l = m.forward_logits(&input).map_err(|e| e.to_string())?;
        check_logits(&l, step, m.position()).map_err(|e| e.to_string())?;
        let id = wgllm::sampling::argmax(&l);
        ids.push(id);
        input = vec![id];
    }
    Ok(ids)
}

fn greedy_opts(max_tokens: usize, stop_ids: Vec<u32>) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: Default::default(),
        stop_ids,
    }
}

/// Pipelined greedy generation against the host loop on lm_heads scaled so
/// that the logits overflow at different steps: identical ids while they
/// are finite, and the identical error (step, context length, NaN/inf
/// counts, first id and value) at the first step that is not. The scales
/// must include a run that stops after step 0 and one that never stops,
/// or the test proves nothing and fails.
#[test]
fn pipelined_greedy_matches_the_host_loop_and_stops_at_the_same_step() {
    let _serial = serial();
    let tok = tokenizer();
    let name = "llama_gqa3_untied";
    let p = prompt(name);
    let max_tokens = 24;
    let mut late_stop = false;
    let mut clean = false;
    // 1.0 and 1e37 stay finite; between 1e37 and 3e37 the largest logit
    // of some step crosses f32::MAX, and of the prompt's pass last.
    let scales = [
        1.0f32, 1e37, 1.2e37, 1.4e37, 1.6e37, 1.8e37, 2.0e37, 2.15e37, 2.3e37, 2.45e37, 2.6e37,
        1e38,
    ];
    for scale in scales {
        let d = tempfile::tempdir().unwrap();
        scaled_head(name, scale, d.path());
        let mut m = load(d.path());
        let want = host_greedy(&mut m, &p, max_tokens);
        let want_pos = m.position();
        m.reset();
        let got = generate(&mut m, &tok, &p, &greedy_opts(max_tokens, vec![]), |_| {})
            .map(|g| g.generated_ids)
            .map_err(|e| e.to_string());
        println!("scale {scale:e}: {:?}", got.as_ref().map(|v| v.len()));
        assert_eq!(got, want, "scale {scale:e}");
        match &want {
            // The last id is emitted but never run.
            Ok(ids) => {
                assert_eq!(m.position(), p.len() + ids.len() - 1, "scale {scale:e}");
                clean = true;
            }
            Err(e) => {
                assert_eq!(m.position(), want_pos, "scale {scale:e}: {e}");
                late_stop |= !e.contains("generation step 0 ");
            }
        }
    }
    assert!(clean, "no scale generated to --max-tokens");
    assert!(late_stop, "no scale overflowed after the prompt's pass");
}

/// EOS and --max-tokens stop the pipelined path exactly: the tokens before
/// the stop id, and the KV cache holding exactly what ran, whatever was in
/// flight.
#[test]
fn pipelined_greedy_stops_exactly_at_eos_and_max_tokens() {
    let _serial = serial();
    for name in ["qwen2_bias_tied", "llama_gqa3_untied"] {
        let p = prompt(name);
        let mut m = load(&fixture(name));
        let all = host_greedy(&mut m, &p, 20).unwrap();
        assert_stops_exactly(name, &mut m, &p, &all, &greedy_opts, &|m, first| {
            // and the cache is right: the next pass sees exactly that prefix
            let next = m.forward_next(&[all[first]]).unwrap();
            assert_eq!(Some(&next), all.get(first + 1), "{name} after {first}");
        });
    }
}

/// `generate` with `opts(max_tokens, stop_ids)` stops exactly at
/// --max-tokens and at the first occurrence of a stop id, against `all`
/// (the host loop's first 20 ids): the tokens before the stop (none past
/// it), and the KV cache holding exactly what ran, whatever was in flight.
/// `after_stop(m, first)` checks the cache after a stop at `all[first]`.
fn assert_stops_exactly(
    name: &str,
    m: &mut Model,
    p: &[u32],
    all: &[u32],
    opts: &dyn Fn(usize, Vec<u32>) -> GenerateOptions,
    after_stop: &dyn Fn(&mut Model, usize),
) {
    let tok = tokenizer();
    for max_tokens in [1usize, 2, 3, 5, 20] {
        m.reset();
        let g = generate(m, &tok, p, &opts(max_tokens, vec![]), |_| {}).unwrap();
        assert_eq!(g.generated_ids, all[..max_tokens], "{name} {max_tokens}");
        assert_eq!(g.stop_reason, "max_tokens");
        assert_eq!(m.position(), p.len() + max_tokens - 1);
    }
    // Stop at the first occurrence of each id that appears after a few
    // steps (so steps past it were in flight).
    for j in [0usize, 1, 4, 9, 15] {
        let stop = all[j];
        let first = all.iter().position(|&t| t == stop).unwrap();
        m.reset();
        let g = generate(m, &tok, p, &opts(20, vec![stop]), |_| {}).unwrap();
        assert_eq!(g.generated_ids, all[..first], "{name} stop at {stop}");
        assert_eq!(g.stop_reason, "eos");
        assert_eq!(m.position(), p.len() + first, "{name} stop at {stop}");
        after_stop(m, first);
    }
}

/// The reference for sampling: every step's whole logits row read back and
/// sampled by the CPU sampler.
fn host_sample(
    m: &mut Model,
    prompt: &[u32],
    max_tokens: usize,
    params: &wgllm::sampling::SamplingParams,
) -> Vec<u32> {
    host_sample_replaced(m, prompt, max_tokens, params, &|_, id| id)
}

/// `generate` samples on the GPU (`ops::sample_full`: penalty,
/// temperature, top-k, top-p, min-p and the draw; only the id comes back);
/// over many seeds and parameter sets (top-p without top-k, min-p, the
/// penalty both ways, greedy with a penalty) it produces exactly the ids of
/// the CPU sampler over whole rows.
#[test]
fn gpu_sampling_matches_the_cpu_sampler() {
    let _serial = serial();
    let tok = tokenizer();
    let mut runs = 0;
    // The sampled runs must actually differ between seeds and parameters,
    // or agreeing with the CPU would prove little.
    let mut distinct = std::collections::HashSet::new();
    let sets = [
        (0.0f32, 0usize, 1.0f32, 0.0f32, 1.3f32, 64usize),
        (0.0, 0, 1.0, 0.0, 0.8, 4),
        (0.9, 40, 1.0, 0.0, 1.0, 64),
        (1.2, 20, 0.9, 0.05, 1.15, 0),
        (0.7, 5, 0.8, 0.0, 0.9, 8),
        (2.0, 300, 0.99, 0.01, 1.0, 64),
        (1.0, 0, 1.0, 0.0, 1.0, 64),
        (0.8, 0, 0.9, 0.0, 1.0, 64),
        (1.1, 0, 1.0, 0.1, 1.0, 64),
        (0.7, 0, 0.95, 0.02, 1.2, 0),
    ];
    for name in ["qwen2_bias_tied", "llama_gqa3_untied"] {
        let p = prompt(name);
        let mut m = load(&fixture(name));
        for seed in 0..5u64 {
            for (temperature, top_k, top_p, min_p, penalty, last_n) in sets {
                let params = wgllm::sampling::SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repeat_penalty: penalty,
                    repeat_last_n: last_n,
                    seed,
                };
                let mut s = wgllm::sampling::Sampler::new(params.clone()).unwrap();
                assert!(s.gpu_step(&p).is_some(), "{params:?} takes the GPU path");
                m.reset();
                let want = host_sample(&mut m, &p, 12, &params);
                m.reset();
                let opts = GenerateOptions {
                    max_tokens: 12,
                    sampling: params.clone(),
                    stop_ids: vec![],
                };
                let got = generate(&mut m, &tok, &p, &opts, |_| {}).unwrap();
                assert_eq!(got.generated_ids, want, "{name} {params:?}");
                if temperature > 0.0 {
                    distinct.insert(want);
                }
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 2 * 5 * sets.len());
    assert!(
        distinct.len() > 50,
        "only {} distinct sampled runs",
        distinct.len()
    );
}

/// `Model::forward_sampled` step by step against the CPU sampler on the
/// same rows: the same ids, nearly every step decided on the GPU (an
/// undecided step is sampled on the host from the row, with the same
/// uniform), with finite stats read back with the pick.
#[test]
fn forward_sampled_decides_on_the_gpu() {
    let _serial = serial();
    let name = "llama_gqa3_untied";
    let p = prompt(name);
    let mut m = load(&fixture(name));
    let (mut steps, mut undecided) = (0, 0);
    for seed in 0..8u64 {
        let params = wgllm::sampling::SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            min_p: 0.02,
            repeat_penalty: 1.1,
            seed,
            ..Default::default()
        };
        let mut cpu = wgllm::sampling::Sampler::new(params.clone()).unwrap();
        let mut gpu_s = wgllm::sampling::Sampler::new(params.clone()).unwrap();
        let mut history = p.clone();
        let mut input = p.clone();
        m.reset();
        for _ in 0..10 {
            let (draw, window) = gpu_s.gpu_step(&history).unwrap();
            let (pk, st) = m.forward_sampled(&input, &draw, &window).unwrap();
            assert!(st.first.is_none());
            let l = m.last_logits().unwrap();
            let want = cpu.sample(&l, &history);
            let got = if pk.uncertain() {
                undecided += 1;
                gpu_s.sample_drawn(&l, &history, &draw)
            } else {
                pk.id
            };
            assert_eq!(got, want, "seed {seed} step {steps} {pk:?}");
            steps += 1;
            history.push(got);
            input = vec![got];
        }
    }
    eprintln!("{undecided} of {steps} steps undecided on the GPU");
    // The margins are a few 1e-7 of the mass: an undecided step is rare.
    assert!(undecided * 10 <= steps, "{undecided} of {steps} undecided");
}

/// The pipelined decode on a device that another thread polls too (a
/// server's, or these tests' shared one). That thread's poll can collect a
/// ring slot's map callback and run it only after its own callbacks, which
/// here sleep: the decode must wait for it rather than report the slot as
/// never mapped (CI once failed exactly so under the GPU profile). Stops
/// at EOS leave steps in flight, so the drain after a stop is covered too.
#[test]
fn pipelined_greedy_waits_for_callbacks_another_thread_collected() {
    let _serial = serial();
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// Polls of the other thread that must overlap the generations, or the
    /// test proves nothing (the loop below runs until they have happened).
    const MIN_POLLS: u64 = 12;
    /// Generations at most: far more than MIN_POLLS polls take (one poll
    /// is its 30 ms callback plus a device wait), so only a poller that
    /// never gets the CPU can exhaust them.
    const MAX_ROUNDS: usize = 400;
    let tok = tokenizer();
    let name = "llama_gqa3_untied";
    let p = prompt(name);
    let mut m = load(&fixture(name));
    let all = host_greedy(&mut m, &p, 12).unwrap();
    let g = gpu();
    let done = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicU64::new(0));
    let poller = {
        let (g, done, polls) = (g.clone(), done.clone(), polls.clone());
        std::thread::spawn(move || {
            let buf = g.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("other thread's readback"),
                size: 4,
                usage: wgpu::BufferUsages::MAP_READ,
                mapped_at_creation: false,
            });
            while !done.load(Ordering::Acquire) {
                buf.slice(..).map_async(wgpu::MapMode::Read, |_| {
                    std::thread::sleep(std::time::Duration::from_millis(30))
                });
                g.device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
                buf.unmap();
                polls.fetch_add(1, Ordering::AcqRel);
            }
        })
    };
    let stops = [1usize, 3, 5, 7, 9];
    let mut rounds = 0;
    while rounds < stops.len() || (polls.load(Ordering::Acquire) < MIN_POLLS && rounds < MAX_ROUNDS)
    {
        let stop = all[stops[rounds % stops.len()]];
        let first = all.iter().position(|&t| t == stop).unwrap();
        m.reset();
        let got = generate(&mut m, &tok, &p, &greedy_opts(12, vec![stop]), |_| {}).unwrap();
        assert_eq!(got.generated_ids, all[..first], "stop at {stop}");
        assert_eq!(m.position(), p.len() + first, "stop at {stop}");
        rounds += 1;
    }
    done.store(true, Ordering::Release);
    poller.join().unwrap();
    let polls = polls.load(Ordering::Acquire);
    assert!(
        polls >= MIN_POLLS,
        "the other thread polled only {polls} times in {rounds} generations"
    );
    println!("{rounds} generations, {polls} polls of the other thread");
}

/// The host loop of a sampled generation with some steps' ids replaced:
/// every step's whole row read back and sampled by the CPU sampler (one
/// uniform per step, drawn whether or not the id is then replaced), then
/// `replace` may put another id in its place.
fn host_sample_replaced(
    m: &mut Model,
    prompt: &[u32],
    max_tokens: usize,
    params: &wgllm::sampling::SamplingParams,
    replace: &dyn Fn(usize, u32) -> u32,
) -> Vec<u32> {
    let mut s = wgllm::sampling::Sampler::new(params.clone()).unwrap();
    let mut history = prompt.to_vec();
    let mut ids = Vec::new();
    let mut input = prompt.to_vec();
    for k in 0..max_tokens {
        let l = m.forward_logits(&input).unwrap();
        let id = replace(k, s.sample(&l, &history));
        ids.push(id);
        history.push(id);
        input = vec![id];
    }
    ids
}

/// A sampled generation on the Model API, as `generate` runs it: the
/// prompt's pick, then `Model::decode_sampled` with the host deciding
/// every flagged step from its row with the same uniform, and `replace`
/// changing picks (to force a roll back). Returns the ids and the run.
fn gpu_sample_replaced(
    m: &mut Model,
    prompt: &[u32],
    max_tokens: usize,
    params: &wgllm::sampling::SamplingParams,
    replace: &dyn Fn(usize, u32) -> u32,
) -> (Vec<u32>, wgllm::model::DecodeRun) {
    use wgllm::model::SampledStep;
    let mut s = wgllm::sampling::Sampler::new(params.clone()).unwrap();
    let d = s.gpu_settings().expect("GPU-able settings");
    let draws = s.draw_table(max_tokens);
    let table: Vec<f32> = draws.iter().map(|&r| r as f32).collect();
    let last_n = s.penalty_last_n();
    assert!(m.sampled_fits(last_n, prompt.len(), max_tokens));
    m.begin_sampled(&d, last_n, prompt, max_tokens, &table)
        .unwrap();
    let host = |row: &[f32], history: &[u32], k: usize| {
        let r = draws.get(k).copied().unwrap_or(0.0);
        s.sample_drawn(row, history, &wgllm::sampling::Draw { r, ..d })
    };
    let mut history = prompt.to_vec();
    let (pk, _) = m.forward_sampled_step(prompt).unwrap();
    let mut id = pk.id;
    if pk.uncertain() {
        id = host(&m.last_logits().unwrap(), &history, 0);
    }
    id = replace(0, id);
    if id != pk.id {
        m.fix_sampled(0, id).unwrap();
    }
    history.push(id);
    let mut k = 0;
    let run = m
        .decode_sampled(id, 1, max_tokens - 1, 3, |pk, st, row| {
            assert!(st.first.is_none());
            k += 1;
            let id = replace(k, row.map_or(pk.id, |l| host(l, &history, k)));
            history.push(id);
            Ok(SampledStep::Next(id))
        })
        .unwrap();
    (history[prompt.len()..].to_vec(), run)
}

/// The pipelined sampled decode's exact fallback: with settings whose
/// steps the GPU often cannot decide within its error bound (temperature
/// 3, top-p 0.99: a flat distribution cut near its whole mass), each
/// flagged step is sampled on the host from that step's own row, and the
/// ids are the host loop's. The run must have had flagged steps, or the
/// test proves nothing.
#[test]
fn pipelined_sampling_decides_flagged_steps_on_the_host() {
    let _serial = serial();
    let (mut host_sampled, mut runs) = (0, 0);
    for name in ["qwen2_bias_tied", "llama_gqa3_untied"] {
        let p = prompt(name);
        let mut m = load(&fixture(name));
        for seed in 0..6u64 {
            for (temperature, top_p, penalty) in [(3.0f32, 0.99f32, 1.0f32), (3.0, 0.99, 1.2)] {
                let params = wgllm::sampling::SamplingParams {
                    temperature,
                    top_p,
                    repeat_penalty: penalty,
                    seed,
                    ..Default::default()
                };
                m.reset();
                let want = host_sample_replaced(&mut m, &p, 16, &params, &|_, id| id);
                m.reset();
                let (got, run) = gpu_sample_replaced(&mut m, &p, 16, &params, &|_, id| id);
                assert_eq!(got, want, "{name} {params:?}");
                // the prompt and every id but the last ran
                assert_eq!(m.position(), p.len() + 15);
                host_sampled += run.host_sampled;
                runs += 1;
            }
        }
    }
    eprintln!("{host_sampled} steps of {runs} runs sampled on the host");
    assert!(
        host_sampled > 0,
        "no step was flagged: the fallback is untested"
    );
}

/// A host id that differs from the GPU's pick rolls the pipeline back: the
/// steps after it are discarded, the KV cache and the GPU's history and
/// step counter take the host's id, and the ids from there are the host
/// loop's with the same replacement (so the cache, the penalty window and
/// the uniforms all followed). Replaced at the prompt's pick, mid-run and
/// at the last step.
#[test]
fn pipelined_sampling_rolls_back_to_the_hosts_id() {
    let _serial = serial();
    for name in ["qwen2_bias_tied", "llama_gqa3_untied"] {
        let p = prompt(name);
        let mut m = load(&fixture(name));
        let vocab = m.cfg.vocab_size as u32;
        for (seed, penalty, last_n) in [(1u64, 1.0f32, 64usize), (2, 1.3, 4), (3, 0.8, 0)] {
            let params = wgllm::sampling::SamplingParams {
                temperature: 0.9,
                top_k: 50,
                top_p: 0.95,
                repeat_penalty: penalty,
                repeat_last_n: last_n,
                seed,
                ..Default::default()
            };
            let replace = |k: usize, id: u32| {
                if [0usize, 3, 4, 9, 13].contains(&k) {
                    (id + 7 + k as u32) % vocab
                } else {
                    id
                }
            };
            m.reset();
            let want = host_sample_replaced(&mut m, &p, 14, &params, &replace);
            // the host's cache after the same tokens, seen by one more step
            let want_next = m.forward_logits(&[want[13]]).unwrap();
            m.reset();
            let (got, run) = gpu_sample_replaced(&mut m, &p, 14, &params, &replace);
            assert_eq!(got, want, "{name} {params:?}");
            assert_eq!(m.position(), p.len() + 13);
            // Steps 3, 4, 9 and 13 of the decode changed (and any flagged
            // step the host decided otherwise); each but the last, with
            // nothing in flight behind it, discarded the two steps in
            // flight (depth 3).
            assert!(run.host_changed >= 4, "{run:?}");
            assert!(run.rolled_back >= 6, "{run:?}");
            // The cache holds exactly the host's: the same kernels on the
            // same cache give the same bits.
            let next = m.forward_logits(&[want[13]]).unwrap();
            assert_eq!(next, want_next, "{name} {params:?}");
        }
    }
}

/// EOS and --max-tokens stop the pipelined sampled path exactly, as the
/// greedy one: the tokens before the stop id (none past it), and the KV
/// cache holding exactly what ran.
#[test]
fn pipelined_sampling_stops_exactly_at_eos_and_max_tokens() {
    let _serial = serial();
    let params = wgllm::sampling::SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        repeat_penalty: 1.1,
        seed: 5,
        ..Default::default()
    };
    for name in ["qwen2_bias_tied", "llama_gqa3_untied"] {
        let p = prompt(name);
        let mut m = load(&fixture(name));
        let all = host_sample_replaced(&mut m, &p, 20, &params, &|_, id| id);
        let opts = |max_tokens, stop_ids| GenerateOptions {
            max_tokens,
            sampling: params.clone(),
            stop_ids,
        };
        // (the KV count is checked; the greedy test checks the contents)
        assert_stops_exactly(name, &mut m, &p, &all, &opts, &|_, _| {});
    }
}

/// After warm-up, a pipelined sampled generation (with a roll back)
/// creates no buffer, bind group or pipeline, and each step records the
/// decode step's ops and the sampler: nothing is built per token.
#[test]
fn pipelined_sampling_creates_nothing_per_token() {
    let _serial = serial();
    let name = "qwen2_bias_tied";
    let p = prompt(name);
    // its own device: the other tests run in parallel on the shared one
    let g = Arc::new(wgllm::gpu::Gpu::new(&wgllm::gpu::GpuOptions::default()).expect("GPU"));
    let opts = ModelOptions {
        max_context: Some(64),
        ..Default::default()
    };
    let mut m = Model::load(g.clone(), &fixture(name), &opts).unwrap();
    let params = wgllm::sampling::SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        repeat_penalty: 1.1,
        seed: 3,
        ..Default::default()
    };
    let replace = |k: usize, id: u32| if k == 4 { (id + 1) % 512 } else { id };
    let first = gpu_sample_replaced(&mut m, &p, 12, &params, &replace).0;
    m.reset();
    let before = g.counters.snapshot();
    let (ids, run) = gpu_sample_replaced(&mut m, &p, 12, &params, &replace);
    let after = g.counters.snapshot();
    assert_eq!(ids, first);
    assert!(run.rolled_back > 0, "{run:?}");
    let made = |c: wgllm::gpu::CounterSnapshot| (c.buffers, c.bind_groups, c.pipelines);
    assert_eq!(made(after), made(before), "buffers, bind groups, pipelines");
    // the decode step's ops and the sampler
    let per_op: usize = m.decode_ops().iter().map(|o| o.dispatches).sum();
    assert_eq!(run.dispatches_per_step, per_op as u64 + 1);
}
