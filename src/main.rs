use std::process::ExitCode;

use clap::{Parser, Subcommand};

use wgllm::cli;

/// The process allocator: mimalloc (feature `mimalloc`, on by default), for
/// Rust's allocations and, through its `override` feature, for the C
/// mallocs of the Vulkan/GL driver wgpu loads. glibc's malloc was 45% of a
/// decode step's host instructions on lavapipe (ARCHITECTURE.md "Host
/// allocator", BENCHMARKS.md). The binary chooses it, never the library.
#[cfg(all(feature = "mimalloc", not(target_arch = "wasm32")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wgllm",
    version,
    about = "Run Hugging Face LLM checkpoints on any GPU through wgpu, verified against PyTorch"
)]
struct Cli {
    /// Adapter to use: index or name substring (see `wgllm devices`).
    #[arg(long, global = true, env = "WGLLM_ADAPTER")]
    adapter: Option<String>,
    /// Backends to look for adapters on: all, vulkan, metal, dx12, gl
    /// (comma-separated for several). Default: $WGLLM_BACKEND, else all.
    #[arg(long, global = true)]
    backend: Option<wgllm::gpu::BackendChoice>,
    /// Kernel profile: auto (by adapter type), gpu or cpu.
    /// Default: $WGLLM_KERNELS, else auto.
    #[arg(long, global = true)]
    kernels: Option<wgllm::gpu::KernelChoice>,
    /// Autotuner at model load: off, cache (use tuned choices cached for
    /// this adapter and model shape) or auto (tune when none are cached).
    /// Default: $WGLLM_TUNE, else cache.
    #[arg(long, global = true)]
    tune: Option<wgllm::gpu::TuneMode>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List every GPU adapter wgpu can see, with its limits and features.
    Devices {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare every layer's outputs on the GPU with the CPU reference and,
    /// optionally, a PyTorch dump (tools/dump_reference.py).
    Verify(cli::VerifyArgs),
    /// Convert a GGUF file to a Hugging Face folder (config.json,
    /// model.safetensors, tokenizer files).
    Convert(cli::ConvertArgs),
    /// Generate text from a prompt (or stdin).
    Run(cli::RunArgs),
    /// Interactive multi-turn chat in the terminal.
    Chat(cli::ChatArgs),
    /// Prefill and decode speed against the device's own measured read
    /// bandwidth (a probe kernel in the same run).
    Bench(wgllm::bench::BenchArgs),
    /// OpenAI-compatible HTTP server with continuous batching
    /// (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).
    Serve(cli::ServeArgs),
    /// Time every candidate shape of the tuned kernels for a model's shapes
    /// on this adapter, print the times and choices, and cache the choices.
    Tune(cli::TuneArgs),
}

/// Transparent huge pages off for this process, unless the user set
/// `MIMALLOC_ALLOW_THP` (mimalloc's own switch for the same thing). mimalloc
/// reserves its arenas in large aligned regions; with THP on, the kernel
/// backs them (and the driver's host-memory "device" buffers on CPU
/// adapters) with 2 MiB pages on first touch, which on a Qwen2.5 load cost
/// about 100 MB of extra peak RSS and 3 s of system time (BENCHMARKS.md
/// "Peak host memory at load").
#[cfg(all(feature = "mimalloc", target_os = "linux"))]
fn disable_thp() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) only sets a flag on
    // this process's memory descriptor; it reads no memory of ours.
    // Failure (a kernel before 3.15) leaves THP as it was, which is only
    // slower, so the result is not an error.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(not(all(feature = "mimalloc", target_os = "linux")))]
fn disable_thp() {}

fn main() -> ExitCode {
    disable_thp();
    let cli = Cli::parse();
    let gpu = &wgllm::GpuOptions {
        adapter: cli.adapter,
        backends: cli.backend,
        kernels: cli.kernels,
        tune: cli.tune,
        ..Default::default()
    };
    let res = match cli.cmd {
        Cmd::Devices { json } => cli::devices(gpu, json),
        Cmd::Verify(a) => cli::verify(gpu, a),
        Cmd::Convert(a) => cli::convert(a),
        Cmd::Run(a) => cli::run(gpu, a),
        Cmd::Chat(a) => cli::chat(gpu, a),
        Cmd::Bench(a) => wgllm::bench::bench_cli(gpu, a),
        Cmd::Serve(a) => cli::serve(gpu, a),
        Cmd::Tune(a) => cli::tune(gpu, a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_text(&e));
            ExitCode::from(2)
        }
    }
}
