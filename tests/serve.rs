//! `wgllm serve` as a user runs it: the built binary on a loopback port
//! (`--port 0`) with the committed Qwen2 fixture plus a 512-token byte-level
//! tokenizer and a ChatML template (as tests/cli.rs assembles them), driven
//! through raw HTTP/1.1 over `TcpStream` (error cases, health, metrics,
//! streaming, stop strings, disconnects, SIGTERM) and through the official
//! `openai` Python client (tools/serve_client_check.py, in a venv under
//! target/ that this test creates with pip).
//!
//! The fixture's config has `eos_token_id: null`, so replies run to
//! `max_tokens` unless a stop string ends them: the greedy comparisons
//! cover every requested token.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scratch;
use serde_json::{json, Value as Json};

/// The Qwen2 fixture with the 512-token tokenizer and ChatML template of
/// tests/cli.rs (`common::with_tokenizer`), made once.
fn chat_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| common::with_tokenizer("qwen2_bias_tied", &scratch().join("chat_model")))
        .clone()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ------------------------------------------------------------- the server

/// A running `wgllm serve`; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(&chat_model(), &scratch().join("cache"), extra)
    }

    /// `wgllm serve --model model` with its model cache in `cache`.
    fn start_with(model: &Path, cache: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--model", path(model), "--port", "0"];
        args.extend_from_slice(extra);
        let mut child = common::wgllm_command(cache)
            .args(&args)
            .env_remove("WGLLM_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wgllm serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if let Some(a) = line.split("listening on http://").nth(1) {
                        let _ = tx.send(a.trim().to_string());
                    }
                    let mut g = log.lock().unwrap();
                    g.push_str(&line);
                    g.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the server printed no address in 60 s:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let s = Server { child, addr, log };
        let t0 = Instant::now();
        loop {
            if let Ok(r) = s.try_request("GET", "/health", &[], None) {
                if r.status == 200 {
                    break;
                }
                assert_eq!(r.status, 503, "{}", r.body);
                assert!(r.body.contains("loading"), "{}", r.body);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "not ready after 120 s:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Resp> {
        request(self.addr, method, path, headers, body)
    }

    fn get(&self, path: &str) -> Resp {
        self.try_request("GET", path, &[], None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    fn post(&self, path: &str, body: &Json) -> Resp {
        self.try_request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
        .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log()))
    }

    /// A metric's value (the first sample line starting with `name`).
    fn metric(&self, name: &str) -> f64 {
        let t = self.get("/metrics").body;
        t.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{t}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Json {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// OpenAI's error object, checked for shape.
    fn error(&self, status: u16) -> Json {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(
            self.headers
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            self.headers
        );
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"].clone()
    }
}

fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        // A server that answers before reading the whole body (413) may
        // close the connection under a large write: that is its answer.
        let _ = s.write_all(b);
    }
    Ok(s)
}

/// One HTTP/1.1 exchange (`Connection: close`), chunked bodies decoded.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut s = send_request(addr, method, path, headers, body)?;
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e);
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no header end: {text}"),
        )
    })?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Resp {
        status,
        headers: head.to_string(),
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// `wgllm run` alone: the greedy text for a prompt.
fn run_greedy(prompt: &str, max_tokens: usize, chat: bool) -> String {
    let m = chat_model();
    let n = max_tokens.to_string();
    let mut args = vec![
        "run",
        "--model",
        path(&m),
        "--prompt",
        prompt,
        "--max-tokens",
        &n,
        "--json",
    ];
    if chat {
        args.push("--chat");
    }
    let o = common::wgllm_command(&scratch().join("cache"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "wgllm run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Json = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), max_tokens);
    v["text"].as_str().unwrap().to_string()
}

fn completion(prompt: &str, max_tokens: usize) -> Json {
    json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

// ------------------------------------------------------------------ tests

#[test]
fn errors_health_models_and_metrics() {
    let s = Server::start(&[
        "--api-key",
        "sekret",
        "--max-context",
        "64",
        "--max-body-bytes",
        "4096",
        "--parallel",
        "2",
    ]);
    let auth = [
        ("Authorization", "Bearer sekret"),
        ("Content-Type", "application/json"),
    ];
    let post = |p: &str, body: &str| {
        s.try_request("POST", p, &auth, Some(body.as_bytes()))
            .unwrap()
    };
    // Health and metrics need no key; /v1 does.
    assert_eq!(s.get("/health").json()["status"], "ok");
    let e = s.get("/v1/models").error(401);
    assert_eq!(e["code"], "invalid_api_key");
    let r = s
        .try_request(
            "POST",
            "/v1/completions",
            &[("Authorization", "Bearer wrong")],
            Some(b"{}"),
        )
        .unwrap();
    assert!(r.error(401)["message"]
        .as_str()
        .unwrap()
        .contains("incorrect"));
    let r = s.try_request("GET", "/v1/models", &auth, None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "chat_model");

    // 404 unknown route, 405 wrong method, both as OpenAI errors.
    assert!(s.get("/v2/nothing").error(404)["message"]
        .as_str()
        .unwrap()
        .contains("/v2/nothing"));
    let r = s
        .try_request("GET", "/v1/completions", &auth, None)
        .unwrap();
    r.error(405);

    // 400s naming the problem.
    for (path, body, want) in [
        ("/v1/completions", "{\"prompt\": ", "not valid JSON"),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": "5"}"#,
            "`max_tokens`",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "n": 2}"#,
            "`n`: only 1",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#,
            "`n`",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": "hi"}"#,
            "`messages`",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "temperature": -1}"#,
            "`temperature`",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [1, 99999]}"#,
            "outside the vocabulary",
        ),
        // 64 tokens of context: a 100-byte prompt of single-byte tokens.
        (
            "/v1/completions",
            &json!({"prompt": "1".repeat(100)}).to_string(),
            "context is 64 tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": 100}"#,
            "exceed this server's context of 64",
        ),
    ] {
        let r = post(path, body);
        let e = r.error(400);
        assert!(e["message"].as_str().unwrap().contains(want), "{body}: {e}");
    }
    // 413 past --max-body-bytes.
    let big = json!({"prompt": "a".repeat(8000)}).to_string();
    let r = post("/v1/completions", &big);
    assert!(r.error(413)["message"].as_str().unwrap().contains("4096"));

    // A good request, then the metrics that count it.
    let r = post("/v1/completions", &completion("hello", 5).to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
    // The engine publishes its gauges right after the step that finished
    // the request, which can be just after the answer went out.
    let t0 = Instant::now();
    while s.metric("wgllm_active_sequences") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    for name in [
        "wgllm_requests_total{outcome=\"length\"} 1",
        "wgllm_http_errors_total{status=\"400\"} 9",
        "wgllm_http_errors_total{status=\"401\"} 2",
        "wgllm_http_errors_total{status=\"413\"} 1",
        "wgllm_generated_tokens_total 5",
        "wgllm_time_to_first_token_seconds_count 1",
        "wgllm_inter_token_latency_seconds_count 4",
        "wgllm_queue_depth 0",
        "wgllm_active_sequences 0",
        "wgllm_slots 2",
        "wgllm_kv_cache_capacity_tokens 128",
        "wgllm_prefix_cache_lookups_total 1",
    ] {
        assert!(m.body.contains(name), "no `{name}` in\n{}", m.body);
    }
    // The finished sequence's tokens stay cached for reuse.
    assert!(s.metric("wgllm_kv_cache_used_tokens") > 0.0);
}

#[test]
fn greedy_equals_wgllm_run_alone_and_beside_four_others() {
    let prompts = [
        "The quick brown fox",
        "hello world, this is a longer prompt than the others",
        "a",
        "zebra crossing",
        "numbers 12345",
    ];
    let n = 24;
    let want: Vec<String> = prompts.iter().map(|p| run_greedy(p, n, false)).collect();
    let s = Server::start(&["--parallel", "5"]);
    // Alone.
    let r = s.post("/v1/completions", &completion(prompts[0], n));
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], want[0].as_str(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], n);
    // Five at once, several times, each against `wgllm run`.
    let steps0 = s.metric("wgllm_decode_steps_total");
    let seqs0 = s.metric("wgllm_decode_step_sequences_total");
    for round in 0..2 {
        let got: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let s = &s;
                    sc.spawn(move || {
                        let v = s.post("/v1/completions", &completion(p, n)).json();
                        v["choices"][0]["text"].as_str().unwrap().to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, want, "round {round}");
    }
    let steps = s.metric("wgllm_decode_steps_total") - steps0;
    let seqs = s.metric("wgllm_decode_step_sequences_total") - seqs0;
    eprintln!("concurrent rounds: {seqs} sequence-steps in {steps} decode passes");
    // They really ran together: decode passes advanced several sequences
    // (10 requests x 23 decode steps each; all alone would be 230 passes).
    assert!(
        seqs >= 2.0 * steps,
        "{seqs} sequence-steps in {steps} passes"
    );
    // The chat endpoint against `run --chat`.
    let want_chat = run_greedy("What is RoPE?", 12, true);
    let v = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "What is RoPE?"}],
                    "max_tokens": 12, "temperature": 0}),
        )
        .json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want_chat.as_str());
    // A second turn reuses the first turn's cached prompt.
    let hits0 = s.metric("wgllm_prefix_cache_hits_total");
    let v2 = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "What is RoPE?"},
                                 {"role": "assistant", "content": want_chat},
                                 {"role": "user", "content": "And GQA?"}],
                    "max_tokens": 4, "temperature": 0}),
        )
        .json();
    assert!(
        v2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{v2}"
    );
    assert_eq!(s.metric("wgllm_prefix_cache_hits_total"), hits0 + 1.0);
}

#[test]
fn streaming_stop_strings_and_logprobs() {
    let s = Server::start(&["--parallel", "2"]);
    let prompt = "stream me";
    let whole = s.post("/v1/completions", &completion(prompt, 20)).json();
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    // Streamed: the same text in chunks, a finish chunk, usage, [DONE].
    let mut body = completion(prompt, 20);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.post("/v1/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r.headers.to_ascii_lowercase().contains("text/event-stream"));
    let data = sse_data(&r.body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.body
    );
    let chunks: Vec<Json> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 20);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // Chat streaming: role first, content deltas, finish.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                      "temperature": 0, "stream": true});
    let data = sse_data(&s.post("/v1/chat/completions", &chat).body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let first: Json = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let fin: Json = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "length");

    // A stop string from the middle of the greedy text: the text before
    // it, finish_reason stop, and the stop text never sent, streamed or not.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[6..9].iter().collect();
    let at = text.find(&stop).unwrap();
    let mut body = completion(prompt, 20);
    body["stop"] = json!(["\u{1}never", stop]);
    let v = s.post("/v1/completions", &body).json();
    assert_eq!(v["choices"][0]["text"], &text[..at], "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let r = s.post("/v1/completions", &body);
    let data = sse_data(&r.body);
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Json>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, &text[..at]);
    // `at` is the first occurrence, so no streamed piece held the stop text.
    assert!(!streamed.contains(&stop));

    // Log-probabilities: one per token, the chosen token is the top one
    // under greedy, and each is a log-probability (<= 0).
    let v = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                    "temperature": 0, "logprobs": true, "top_logprobs": 3}),
        )
        .json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6, "{v}");
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(lp <= 0.0);
        // Greedy picks the most likely token: its logprob is the top one
        // (the same f64 value, computed once per step).
        assert_eq!(top[0]["logprob"].as_f64().unwrap(), lp, "{t}");
        assert!(top[1]["logprob"].as_f64().unwrap() <= lp);
    }
    let v = s
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2}),
        )
        .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4, "{v}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["text_offset"][0], 0);

    // Sampling with a seed is reproducible.
    let seeded =
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 42});
    let a = s.post("/v1/completions", &seeded).json();
    let b = s.post("/v1/completions", &seeded).json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[test]
fn a_disconnect_mid_stream_frees_the_slot() {
    let s = Server::start(&["--parallel", "1"]);
    let mut body = completion("run long", 240);
    body["stream"] = json!(true);
    let mut c = send_request(
        s.addr,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
    .unwrap();
    // Read until the first event, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    drop(c);
    let t0 = Instant::now();
    while s.metric("wgllm_requests_total{outcome=\"cancelled\"}") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the disconnected stream was not cancelled:\n{}",
            s.get("/metrics").body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("wgllm_active_sequences"), 0.0);
    // It ended well before its 240 tokens, and the one slot serves the next
    // request.
    assert!(s.metric("wgllm_generated_tokens_total") < 240.0);
    let v = s.post("/v1/completions", &completion("next", 3)).json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn a_full_queue_answers_503() {
    let s = Server::start(&["--parallel", "1", "--max-queue", "1"]);
    let addr = s.addr;
    let post = move |prompt: &str, n: usize| {
        let body = completion(prompt, n).to_string();
        std::thread::spawn(move || {
            request(
                addr,
                "POST",
                "/v1/completions",
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
            .unwrap()
        })
    };
    // One request holds the only slot, a second waits in the queue...
    let a = post("hold the slot", 240);
    let t0 = Instant::now();
    while s.metric("wgllm_active_sequences") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(2));
    }
    let b = post("wait in the queue", 3);
    while s.metric("wgllm_queue_depth") < 1.0 {
        assert!(
            s.metric("wgllm_requests_total{outcome=\"length\"}") == 0.0,
            "the first request finished before the queue filled"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // ...so a third is refused with 503, and the other two complete.
    let e = s
        .post("/v1/completions", &completion("no room", 3))
        .error(503);
    assert!(e["message"].as_str().unwrap().contains("busy"), "{e}");
    for h in [a, b] {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    }
    assert_eq!(s.metric("wgllm_http_errors_total{status=\"503\"}"), 1.0);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_accepting_and_exits_zero_within_the_grace_period() {
    let mut s = Server::start(&["--parallel", "1", "--grace-seconds", "1"]);
    // A long stream in flight when the signal comes.
    let mut body = completion("long", 240);
    body["stream"] = json!(true);
    let addr = s.addr;
    let h = std::thread::spawn(move || {
        request(
            addr,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    });
    let t0 = Instant::now();
    while s.metric("wgllm_active_sequences") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = s.child.id() as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t1 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", s.log());
    // The stream ended with [DONE] (finished or cancelled), not a cut.
    let r = h.join().unwrap().unwrap();
    assert!(r.body.trim_end().ends_with("data: [DONE]"), "{}", r.body);
    assert!(s.log().contains("stopping"), "{}", s.log());
    // Nothing listens any more.
    assert!(TcpStream::connect(addr).is_err());
}

/// A venv with the `openai` package under target/ (made once, reused).
fn openai_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-openai-venv");
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if py.exists() && ok(&py) {
        return py;
    }
    let st = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .expect("python3 is needed for the openai client check");
    assert!(st.success(), "python3 -m venv failed");
    let st = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ])
        .status()
        .expect("run pip");
    assert!(
        st.success(),
        "pip install openai failed (network or PyPI unavailable)"
    );
    assert!(ok(&py), "openai does not import after pip install");
    py
}

#[test]
fn the_official_openai_client_works() {
    let py = openai_venv();
    let s = Server::start(&["--parallel", "2", "--api-key", "test-key"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/serve_client_check.py");
    let want = run_greedy("The quick brown fox", 10, false);
    let o = Command::new(&py)
        .arg(&script)
        .args(["--base-url", &format!("http://{}/v1", s.addr)])
        .args(["--api-key", "test-key", "--model", "chat_model"])
        .args(["--expect-greedy", "The quick brown fox", &want])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "client check failed:\n{out}\n{err}\n--- server\n{}",
        s.log()
    );
    assert!(out.contains("all checks passed"), "{out}");
}

/// A `.gguf` under `--dtype bf16` is converted into the cache's bf16 folder
/// as `run` does (serve once resolved every GGUF at its own types), and a
/// SentencePiece completion's text is its prompt's continuation, the same
/// text as `wgllm run` (tests/fixtures/spm/llama.gguf: a tiny random llama
/// carrying the vocabulary, so the text is noise, but the same noise).
#[test]
fn a_gguf_served_as_bf16_completes_like_run() {
    let gguf = common::fixture("spm/llama.gguf");
    let cache = scratch().join("spm-cache");
    let prompt = "The tokenizer will";
    let s = Server::start_with(&gguf, &cache, &["--dtype", "bf16", "--max-context", "64"]);
    // The log is read on its own thread: the line may trail /health.
    let t0 = Instant::now();
    let line = loop {
        let log = s.log();
        if let Some(l) = log.lines().find(|l| l.contains("wgllm serve: loaded")) {
            break l.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no `loaded` line:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains("-bf16"), "{line}");
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let served = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    let o = common::wgllm_command(&cache)
        .args([
            "run",
            "--model",
            path(&gguf),
            "--dtype",
            "bf16",
            "--max-context",
            "64",
        ])
        .args(["--prompt", prompt, "--max-tokens", "4", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Json = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 4, "{v}");
    assert_eq!(served, v["text"].as_str().unwrap(), "{v}");
}
