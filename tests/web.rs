//! The browser build in a real headless Chromium (Debian's package, WebGPU
//! on SwiftShader): builds web/ with tools/build_web.sh, serves it and the
//! fixtures from a loopback server started here, and drives the page
//! (web/wgllm.js's driven mode), which POSTs back what it shows. Checks:
//! every committed tiny fixture's last-token logits against the PyTorch f32
//! dump at the f32 tolerances, its greedy ids token for token, Verify (GPU
//! vs the wasm CPU reference and the dump, every tap) passing with the
//! table in the page, and a missing weight file, a corrupt weight file and
//! a context the adapter cannot hold (typed into the page's "max context"
//! field) each shown as a clear error in the page's words.
//!
//! Chromium, the wasm32 target or the wasm-bindgen CLI missing is a
//! failure naming tools/setup.sh, never a pass.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use wgllm::compare::{metrics, RefKind, Tolerances};
use wgllm::taps::TapSet;

mod common;

use common::{fixture, fixture_reference, repo_root as root, FIXTURES};

/// The fixture the broken folders are made from.
const BROKEN_FROM: &str = "qwen2_bias_tied";

/// The real model folder served at /models/real/ (the ignored test's).
static REAL_MODEL: OnceLock<PathBuf> = OnceLock::new();

fn on_path(tool: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(Path::new(&h).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The tools the page needs, or a panic naming what is missing.
fn require_tools() -> PathBuf {
    let chromium = on_path("chromium").unwrap_or_else(|| {
        panic!("chromium is not installed: run tools/setup.sh (Debian package `chromium`)")
    });
    let wb = on_path("wasm-bindgen")
        .unwrap_or_else(|| panic!("the wasm-bindgen CLI is not installed: run tools/setup.sh"));
    let v = Command::new(&wb)
        .arg("--version")
        .output()
        .expect("wasm-bindgen --version");
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).expect("Cargo.lock");
    let want = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"wasm-bindgen\"\n"))
        .and_then(|p| p.lines().find(|l| l.starts_with("version = ")))
        .map(|l| {
            l.trim_start_matches("version = ")
                .trim_matches('"')
                .to_string()
        })
        .expect("wasm-bindgen in Cargo.lock");
    let got = String::from_utf8_lossy(&v.stdout);
    assert!(
        got.split_whitespace().any(|w| w == want),
        "wasm-bindgen CLI is {got:?} but the crate is {want}: run tools/setup.sh"
    );
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        targets
            .lines()
            .any(|l| l.trim() == "wasm32-unknown-unknown"),
        "rustup target wasm32-unknown-unknown is not installed: run tools/setup.sh"
    );
    chromium
}

fn build_page() {
    let st = Command::new("bash")
        .arg(root().join("tools/build_web.sh"))
        .current_dir(root())
        .status()
        .expect("run tools/build_web.sh");
    assert!(st.success(), "tools/build_web.sh failed");
}

/// The bytes served at `path`, or None (404).
fn serve_path(path: &str) -> Option<(Vec<u8>, &'static str)> {
    let path = path.split('?').next().unwrap_or("");
    if path.split('/').any(|c| c == "..") {
        return None;
    }
    let broken_from = |name: &str| std::fs::read(fixture(BROKEN_FROM).join(name)).ok();
    let file = match path {
        "/" | "/index.html" => std::fs::read(root().join("web/index.html")).ok(),
        "/broken/missing/config.json" | "/broken/corrupt/config.json" => broken_from("config.json"),
        // The header promises tensors the file no longer holds.
        "/broken/corrupt/model.safetensors" => broken_from("model.safetensors").map(|mut b| {
            b.truncate(b.len() / 2);
            b
        }),
        p if p.starts_with("/broken/") => None,
        p if p.starts_with("/models/real/") => {
            std::fs::read(REAL_MODEL.get()?.join(&p["/models/real/".len()..])).ok()
        }
        p if p.starts_with("/fixtures/") => std::fs::read(root().join("tests").join(&p[1..])).ok(),
        p => std::fs::read(root().join("web").join(&p[1..])).ok(),
    }?;
    let mime = if path.ends_with(".js") {
        "text/javascript"
    } else if path.ends_with(".wasm") {
        "application/wasm"
    } else if path.ends_with(".json") {
        "application/json"
    } else if path.ends_with('/') || path.ends_with(".html") {
        "text/html"
    } else {
        "application/octet-stream"
    };
    Some((file, mime))
}

fn handle(stream: TcpStream, results: &mpsc::Sender<String>) -> std::io::Result<()> {
    let mut r = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut out = stream;
    if method == "POST" && path == "/result" {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let _ = results.send(String::from_utf8_lossy(&body).into_owned());
        return out.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }
    match serve_path(path) {
        Some((body, mime)) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: {mime}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(&body)
        }
        None => out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    }
}

/// A loopback server for the page; results POSTed to /result arrive on the
/// returned channel. Its thread ends with the test process.
fn serve() -> (u16, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = handle(s, &tx);
            });
        }
    });
    (port, rx)
}

/// Chromium, killed when dropped.
struct Browser(Child, PathBuf);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn open(chromium: &Path, url: &str) -> Browser {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let profile = std::env::temp_dir().join(format!(
        "wgllm-web-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let child = Command::new(chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--enable-unsafe-webgpu",
            "--use-webgpu-adapter=swiftshader",
            "--enable-unsafe-swiftshader",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    Browser(child, profile)
}

#[test]
fn the_page_in_headless_chromium_matches_pytorch_and_shows_errors() {
    let chromium = require_tools();
    build_page();
    let (port, results) = serve();
    let url = format!(
        "http://127.0.0.1:{port}/?base=fixtures/&run={}&broken=broken/missing,broken/corrupt&huge={BROKEN_FROM}",
        FIXTURES.join(",")
    );
    let _browser = open(&chromium, &url);
    // SwiftShader runs WebGPU on the CPU; the eight tiny fixtures take
    // seconds each. Generous, so a loaded CI machine does not time out.
    let body = results
        .recv_timeout(Duration::from_secs(600))
        .expect("the page posted no result within 600 s");
    let v: serde_json::Value = serde_json::from_str(&body).expect("result JSON");
    let adapter = v["adapter"]
        .as_str()
        .unwrap_or_else(|| panic!("no adapter: {body}"));
    eprintln!("page adapter: {adapter}");

    let tol = Tolerances::defaults(RefKind::F32).for_tap("logits");
    for name in FIXTURES {
        let r = &v["fixtures"][name];
        assert!(
            r["error"].is_null(),
            "{name}: the page shows an error: {}",
            r["error"]
        );
        // Last-token logits against transformers f32, at verify's f32
        // tolerance for the logits tap (compare::Tolerances::defaults).
        let dump = fixture(name).join("reference_f32.safetensors");
        let want = TapSet::load(&dump).unwrap();
        let wl = want.get("logits").unwrap();
        let last = &wl.data[(wl.rows - 1) * wl.cols..];
        let got: Vec<f32> = r["logits"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no logits"))
            .iter()
            .map(|x| x.as_f64().expect("finite logit") as f32)
            .collect();
        assert_eq!(got.len(), last.len(), "{name}: logits length");
        let m = metrics(&got, last);
        eprintln!(
            "{name}: logits nmse {:.2e} max_rel {:.2e}; page ms {}",
            m.nmse, m.max_rel, r["ms"]
        );
        assert!(
            m.nmse <= tol.nmse && m.max_rel <= tol.max_rel,
            "{name}: logits nmse {:e} max_rel {:e} over {tol:?}",
            m.nmse,
            m.max_rel
        );
        let greedy: Vec<u32> = r["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(greedy, fixture_reference(name).1, "{name}: greedy ids");
        // Verify: the CPU reference and both dumps, every tap, all pass.
        assert_eq!(
            r["pass"], true,
            "{name}: verify failed:\n{}",
            r["table_text"]
        );
        let reports = r["reports"].as_array().unwrap();
        assert_eq!(
            reports.len(),
            3,
            "{name}: cpu + f32 + bf16 dumps: {reports:?}"
        );
        let table = r["table_text"].as_str().unwrap();
        assert!(table.contains("against cpu-reference"), "{name}: {table}");
        assert!(
            table.contains("all ") && table.contains(" taps pass"),
            "{name}: {table}"
        );
    }

    let missing = v["broken"]["broken/missing"]["error_text"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "missing weights were not refused: {}",
                v["broken"]["broken/missing"]
            )
        });
    eprintln!("missing: {missing}");
    assert!(
        missing.contains("no model.safetensors or model.safetensors.index.json")
            && missing.contains("broken/missing"),
        "{missing}"
    );
    let corrupt = v["broken"]["broken/corrupt"]["error_text"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "a corrupt weight file was not refused: {}",
                v["broken"]["broken/corrupt"]
            )
        });
    eprintln!("corrupt: {corrupt}");
    assert!(
        corrupt.contains("broken/corrupt/model.safetensors"),
        "{corrupt}"
    );
    let huge = v["huge"]["error_text"]
        .as_str()
        .unwrap_or_else(|| panic!("an oversized context was not refused: {}", v["huge"]));
    eprintln!("huge context: {huge}");
    // The page's words: the fix is its "max context" field, not the
    // CLI's flag, which a page user cannot pass.
    assert!(
        huge.contains("needs a KV cache buffer")
            && huge.contains("set \"max context\" to ")
            && !huge.contains("--"),
        "{huge}"
    );
}

/// SmolLM2-135M-Instruct (bf16, fetched through the project's fetch path)
/// in the page: load, one chat turn through its chat template whose greedy
/// ids equal native `wgllm run --chat`'s on the same prompt, Verify on a
/// prompt passing every tap against the wasm CPU reference, and Verify
/// with interleaved RoPE injected failing with the first failing tap
/// (layer 0's q_rope) marked in the page. Minutes on SwiftShader:
/// `cargo test --release --test web -- --ignored --nocapture`.
#[test]
#[ignore = "real model (fetched into the test cache), minutes on SwiftShader"]
fn smollm2_in_the_page_chats_like_native_and_verifies() {
    let chromium = require_tools();
    let dir = wgllm::fetch::resolve_model(
        Some(Path::new("smollm2-135m-instruct")),
        &common::test_fetch_options(),
    )
    .expect("SmolLM2 (fetched through the project's fetch path)");
    REAL_MODEL.set(dir.clone()).unwrap();
    const PROMPT: &str = "What is the capital of France?";
    const MAX_TOKENS: usize = 16;
    let native = Command::new(env!("CARGO_BIN_EXE_wgllm"))
        .arg("run")
        .arg("--model")
        .arg(&dir)
        .args(["--chat", "--prompt", PROMPT, "--json"])
        .args(["--max-tokens", &MAX_TOKENS.to_string()])
        .output()
        .expect("run wgllm");
    assert!(
        native.status.success(),
        "wgllm run: {}",
        String::from_utf8_lossy(&native.stderr)
    );
    let native: serde_json::Value = serde_json::from_slice(&native.stdout).expect("run --json");
    build_page();
    let (port, results) = serve();
    let url = format!(
        "http://127.0.0.1:{port}/?real=models/real/&max_tokens={MAX_TOKENS}&chat={}",
        PROMPT.replace(' ', "%20").replace('?', "%3F")
    );
    let _browser = open(&chromium, &url);
    let body = results
        .recv_timeout(Duration::from_secs(1800))
        .expect("the page posted no result within 1800 s");
    let v: serde_json::Value = serde_json::from_str(&body).expect("result JSON");
    let r = &v["real"];
    assert!(
        r["error"].is_null(),
        "the page shows an error: {}",
        r["error"]
    );
    eprintln!("page adapter: {}", v["adapter"]);
    let chat = &r["chat"];
    eprintln!(
        "page: {:?}, prefill {} tok/s, decode {} tok/s; native prefill {} tok/s, decode {} tok/s",
        chat["text"],
        chat["prefill_tokens_per_s"],
        chat["decode_tokens_per_s"],
        native["prefill_tokens_per_s"],
        native["decode_tokens_per_s"]
    );
    assert_eq!(chat["prompt_ids"], native["prompt_ids"], "chat template");
    // Greedy on f32 accumulation both ways: the same ids token for token
    // (only a near-tie, which this prompt does not have, could differ).
    assert_eq!(chat["generated_ids"], native["generated_ids"], "greedy ids");
    assert!(
        !r["reply_text"].as_str().unwrap_or("").trim().is_empty(),
        "no streamed reply"
    );
    assert_eq!(chat["text"], native["text"]);
    let table = r["verify"]["table_text"].as_str().unwrap_or("");
    assert_eq!(r["verify"]["pass"], true, "verify failed:\n{table}");
    assert!(
        table.contains("against cpu-reference") && table.contains(" taps pass"),
        "{table}"
    );
    let bug = &r["verify_bug"];
    assert_eq!(bug["pass"], false, "interleaved RoPE passed verify");
    let first = bug["reports"][0]["first_failure"].as_str().unwrap_or("");
    assert_eq!(first, "layers.0.q_rope", "{}", bug["summary_text"]);
    let marked = bug["marked"].as_array().expect("marked rows");
    assert!(
        marked.len() == 1
            && marked[0].as_str().is_some_and(
                |l| l.starts_with("layers.0.q_rope ") && l.contains("<< first failure")
            ),
        "the page marks {marked:?}"
    );
}
