use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Devices { json } => wgllm::cli::devices(cli.adapter.as_deref(), json),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
