//! Host-side cost of one greedy decode step, for profiling (`perf`,
//! `valgrind --tool=callgrind`): load a model, prefill a short prompt, then
//! in a thread named `wgllm-rec` (so `perf report --comm wgllm-rec` keeps it
//! apart from the load):
//! - `record`: record `steps` decode-step command buffers and drop them
//!   unsubmitted (nothing runs on the device);
//! - `cold`: the same, reading 512 MiB of host memory between steps (the
//!   caches as lavapipe leaves them after running a step on the same cores);
//! - `submit`: record, submit and wait for each step;
//! - `greedy`: `steps` pipelined greedy steps
//!   ([`wgllm::model::Model::decode_greedy`], `bench`'s host figure).
//!
//! Prints the median and mean thread CPU ms per step (record, submit, both)
//! and the dispatch count.
//!
//! ```text
//! cargo run --release --example record_steps -- <model dir> [record|cold|submit|greedy] [steps]
//! ```

use std::sync::Arc;

/// The `wgllm` binary's allocator (src/main.rs), so this measures what the
/// binary gets; `--no-default-features` measures glibc's.
#[cfg(all(feature = "mimalloc", not(target_arch = "wasm32")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use wgllm::gpu::{Gpu, GpuOptions};
use wgllm::model::{Model, ModelOptions};

fn stats(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    format!(
        "median {:.4} mean {:.4} min {:.4}",
        ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN),
        mean,
        ms.first().copied().unwrap_or(f64::NAN)
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: record_steps <model dir> [record|cold|submit|greedy] [steps]";
    let dir = args.next().ok_or(usage)?;
    let mode = args.next().unwrap_or_else(|| "record".into());
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let gpu = Arc::new(Gpu::new(&GpuOptions::default())?);
    let opts = ModelOptions {
        max_context: Some(1024),
        ..ModelOptions::default()
    };
    let mut model = Model::load(gpu.clone(), std::path::Path::new(&dir), &opts)?;
    let first = model.forward_next(&[1, 2, 3, 4])?;
    let d0 = gpu.counters.snapshot().dispatches;
    let pairs: Vec<(f64, f64)> = match mode.as_str() {
        "record" | "cold" | "submit" => {
            let m = &model;
            let submit = mode == "submit";
            let cold = mode == "cold";
            std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name("wgllm-rec".into())
                    .spawn_scoped(s, move || {
                        let mut junk = if cold {
                            vec![1u64; 64 << 20]
                        } else {
                            Vec::new()
                        };
                        let mut sum = 0u64;
                        let r = m.profile_record_decode(steps, submit, || {
                            for (i, x) in junk.iter_mut().enumerate().step_by(8) {
                                *x = x.wrapping_add(i as u64);
                                sum = sum.wrapping_add(*x);
                            }
                        });
                        std::hint::black_box(sum);
                        r
                    })
                    .expect("spawn")
                    .join()
                    .expect("join")
            })?
        }
        "greedy" => {
            let run =
                model.decode_greedy(first, steps, wgllm::model::DECODE_DEPTH, |_| Ok(true))?;
            run.record_cpu_s.into_iter().map(|s| (s, 0.0)).collect()
        }
        other => return Err(format!("mode {other:?}: expected one of {usage}").into()),
    };
    let dispatches = (gpu.counters.snapshot().dispatches - d0) / steps.max(1) as u64;
    let ms = |f: fn(&(f64, f64)) -> f64| pairs.iter().map(f).map(|s| s * 1e3).collect();
    println!(
        "{mode}: {} steps, {dispatches} dispatches/step, thread CPU ms/step: record {}; submit {}; both {}",
        pairs.len(),
        stats(ms(|p| p.0)),
        stats(ms(|p| p.1)),
        stats(ms(|p| p.0 + p.1)),
    );
    Ok(())
}
