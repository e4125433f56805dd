//! `wgllm serve`: an OpenAI-compatible HTTP server (axum on tokio) over a
//! continuous-batching [`scheduler::Scheduler`].
//!
//! Threads: tokio's runtime runs the HTTP side (parsing, tokenization,
//! validation, JSON and SSE); ONE engine thread loads the model and owns it
//! and the scheduler (wgpu work blocks). Requests reach the engine thread
//! through a channel bounded by `max_queue` (503 past it); events come back
//! through one channel per request, whose closing (the client went away)
//! frees the sequence's slot at the next step.

pub mod api;
pub mod metrics;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use api::{ApiError, Kind, Meta, Prompt};
use metrics::Metrics;
use scheduler::{Engine, Event, GenRequest, Scheduler, TokenLogprob};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 = any free port (the bound address goes to `on_listen`).
    pub port: u16,
    /// Requests answered with 401 unless they carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Requests waiting for a slot beyond which new ones get 503.
    pub max_queue: usize,
    /// After SIGTERM/SIGINT, how long in-flight requests may run on.
    pub grace: Duration,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
}

/// What the engine thread's loader returns.
pub struct Loaded<E> {
    pub engine: E,
    pub tok: Tokenizer,
    /// The chat template, or why there is none (the chat endpoint then
    /// answers 400 with it).
    pub template: std::result::Result<ChatTemplate, String>,
    pub stop_ids: Vec<u32>,
}

struct Ready {
    tok: Arc<Tokenizer>,
    template: std::result::Result<ChatTemplate, String>,
    max_context: usize,
}

struct App {
    opts: ServeOptions,
    ready: OnceLock<Ready>,
    tx: std::sync::mpsc::Sender<GenRequest>,
    queue: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    /// Set when the grace period is over: the engine fails what is left.
    cancel_all: AtomicBool,
    next_id: AtomicU64,
}

impl<T: scheduler::TextDecoder> scheduler::TextDecoder for Arc<T> {
    fn decode(&self, prompt: &[u32], ids: &[u32]) -> Result<String> {
        (**self).decode(prompt, ids)
    }
    fn token_text(&self, id: u32) -> String {
        (**self).token_text(id)
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_response(status: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

impl App {
    fn error(&self, e: ApiError) -> Response {
        self.metrics.http_error(e.status);
        json_response(e.status, &e.body())
    }

    fn check_key(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let Some(key) = &self.opts.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(
                    401,
                    "invalid_request_error",
                    if given.is_none() {
                        "missing API key: send `Authorization: Bearer <key>`"
                    } else {
                        "incorrect API key"
                    },
                )
            })
        }
    }

    fn ready(&self) -> std::result::Result<&Ready, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                503,
                "server_error",
                "the server is shutting down",
            ));
        }
        self.ready
            .get()
            .ok_or_else(|| ApiError::new(503, "server_error", "the model is still loading"))
    }
}

/// Prompt ids for a parsed request, checked against the context.
fn prompt_ids(r: &Ready, req: &api::Request) -> std::result::Result<(Vec<u32>, usize), ApiError> {
    let internal = |e: Error| ApiError::bad(e.to_string());
    let ids = match &req.prompt {
        Prompt::Messages(m) => {
            let t = r.template.as_ref().map_err(|why| {
                ApiError::bad(format!(
                    "this model has no usable chat template ({why}): use /v1/completions"
                ))
            })?;
            // As `wgllm run --chat`: special tokens come from the template.
            r.tok
                .encode(&t.render(m, true).map_err(internal)?)
                .map_err(internal)?
        }
        // As `wgllm run`: control tokens written in the prompt are parsed.
        Prompt::Text(s) => r.tok.encode_with_special(s).map_err(internal)?,
        Prompt::Tokens(t) => {
            let v = r.tok.vocab_size();
            if let Some(bad) = t.iter().find(|&&id| id as usize >= v) {
                return Err(ApiError::field(
                    "prompt",
                    format!("`prompt`: token id {bad} is outside the vocabulary (size {v})"),
                ));
            }
            t.clone()
        }
    };
    if ids.is_empty() {
        return Err(ApiError::field("prompt", "the prompt encodes to no tokens"));
    }
    let ctx = r.max_context;
    if ids.len() >= ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(format!(
                "the prompt is {} tokens; this server's context is {ctx} tokens per sequence (at most {} prompt tokens)",
                ids.len(),
                ctx - 1
            ))
        });
    }
    let room = ctx - ids.len();
    let max = match req.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError {
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
                ..ApiError::bad(format!(
                    "`max_tokens` {m} + the prompt's {} tokens exceed this server's context of {ctx} tokens (at most {room} new tokens)",
                    ids.len()
                ))
            })
        }
        Some(m) => m,
        None => room,
    };
    Ok((ids, max))
}

async fn generate(
    State(app): State<Arc<App>>,
    kind: Kind,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(e) = app.check_key(&headers) {
        return app.error(e);
    }
    let body = match body {
        Ok(b) => b,
        Err(rej) => {
            let status = rej.status().as_u16();
            let msg = if status == 413 {
                format!(
                    "the request body is larger than this server's limit of {} bytes",
                    app.opts.max_body_bytes
                )
            } else {
                format!("cannot read the request body: {}", rej.body_text())
            };
            return app.error(ApiError::new(status, "invalid_request_error", msg));
        }
    };
    let req = match api::parse(kind, &body) {
        Ok(r) => r,
        Err(e) => return app.error(e),
    };
    let ready = match app.ready() {
        Ok(r) => r,
        Err(e) => return app.error(e),
    };
    let (ids, max_tokens) = match prompt_ids(ready, &req) {
        Ok(x) => x,
        Err(e) => return app.error(e),
    };
    let n = app.next_id.fetch_add(1, Ordering::SeqCst);
    let mut sampling = req.sampling.clone();
    if !req.seeded {
        // No seed: a different draw per request.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        sampling.seed = t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    let max_queue = app.opts.max_queue;
    if app
        .queue
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
            (q < max_queue).then_some(q + 1)
        })
        .is_err()
    {
        return app.error(ApiError::new(
            503,
            "server_error",
            format!("the server is busy: {max_queue} requests are already waiting; retry later"),
        ));
    }
    let (tx, rx) = unbounded_channel();
    let g = GenRequest {
        prompt: ids,
        max_tokens,
        sampling,
        stop: req.stop.clone(),
        logprobs: req.logprobs,
        arrived: Instant::now(),
        events: tx,
    };
    if app.tx.send(g).is_err() {
        app.queue.fetch_sub(1, Ordering::SeqCst);
        return app.error(ApiError::new(503, "server_error", "the engine has stopped"));
    }
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Completion => format!("cmpl-{n}"),
    };
    let created = now_s();
    if req.stream {
        stream_response(app.clone(), kind, id, created, req.include_usage, rx)
    } else {
        whole_response(&app, kind, id, created, req.logprobs.is_some(), rx).await
    }
}

async fn whole_response(
    app: &App,
    kind: Kind,
    id: String,
    created: u64,
    want_lp: bool,
    mut rx: UnboundedReceiver<Event>,
) -> Response {
    let mut text = String::new();
    let mut lps: Vec<TokenLogprob> = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta { text: t, logprobs } => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Event::Done {
                finish_reason,
                usage,
            } => {
                let m = Meta {
                    id: &id,
                    created,
                    model: &app.opts.model_name,
                };
                let v = api::response(
                    kind,
                    &m,
                    &text,
                    want_lp.then_some(&lps[..]),
                    finish_reason,
                    &usage,
                );
                return json_response(200, &v);
            }
            Event::Error(e) => return app.error(ApiError::new(500, "server_error", e)),
        }
    }
    app.error(ApiError::new(
        500,
        "server_error",
        "the engine dropped the request",
    ))
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    app: Arc<App>,
    kind: Kind,
    id: String,
    created: u64,
    include_usage: bool,
    first: bool,
    done: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Server-sent events in OpenAI's chunk format, ending with `[DONE]`. The
/// stream owns the request's receiver: when the client disconnects, hyper
/// drops the body, the receiver closes, and the engine frees the slot.
fn stream_response(
    app: Arc<App>,
    kind: Kind,
    id: String,
    created: u64,
    include_usage: bool,
    rx: UnboundedReceiver<Event>,
) -> Response {
    let st = StreamState {
        rx,
        app,
        kind,
        id,
        created,
        include_usage,
        first: true,
        done: false,
    };
    let s = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        fn meta(st: &StreamState) -> Meta<'_> {
            Meta {
                id: &st.id,
                created: st.created,
                model: &st.app.opts.model_name,
            }
        }
        let out = match st.rx.recv().await {
            Some(Event::Delta { text, logprobs }) => {
                let lps = (!logprobs.is_empty()).then_some(&logprobs[..]);
                let c = api::chunk(
                    st.kind,
                    &meta(&st),
                    Some(&text),
                    st.first,
                    lps,
                    None,
                    st.include_usage,
                );
                st.first = false;
                sse(&c)
            }
            Some(Event::Done {
                finish_reason,
                usage,
            }) => {
                st.done = true;
                let mut b = String::new();
                let m = meta(&st);
                let last = api::chunk(
                    st.kind,
                    &m,
                    st.first.then_some(""),
                    st.first,
                    None,
                    Some(finish_reason),
                    st.include_usage,
                );
                b.push_str(&format!("data: {last}\n\n"));
                if st.include_usage {
                    let u = api::usage_chunk(st.kind, &m, &usage);
                    b.push_str(&format!("data: {u}\n\n"));
                }
                b.push_str("data: [DONE]\n\n");
                Bytes::from(b)
            }
            Some(Event::Error(e)) => {
                st.done = true;
                st.app.metrics.http_error(500);
                let e = ApiError::new(500, "server_error", e);
                Bytes::from(format!("data: {}\n\ndata: [DONE]\n\n", e.body()))
            }
            None => return None,
        };
        Some((Ok::<Bytes, std::convert::Infallible>(out), st))
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(s))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn chat(
    st: State<Arc<App>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, Kind::Chat, headers, body).await
}

async fn completions(
    st: State<Arc<App>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, Kind::Completion, headers, body).await
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.check_key(&headers) {
        return app.error(e);
    }
    json_response(
        200,
        &json!({"object": "list", "data": [{
            "id": app.opts.model_name, "object": "model", "created": 0, "owned_by": "wgllm",
        }]}),
    )
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        json_response(503, &json!({"status": "shutting down"}))
    } else if app.ready.get().is_some() {
        json_response(200, &json!({"status": "ok"}))
    } else {
        json_response(503, &json!({"status": "loading"}))
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn not_found(State(app): State<Arc<App>>, uri: axum::http::Uri) -> Response {
    app.error(ApiError::new(
        404,
        "invalid_request_error",
        format!("unknown route {}", uri.path()),
    ))
}

async fn wrong_method(
    State(app): State<Arc<App>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    app.error(ApiError::new(
        405,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    ))
}

/// The engine thread: load, then schedule until the request channel closes
/// or `quit` is set.
fn engine_thread<E: Engine>(
    app: Arc<App>,
    loaded: Loaded<E>,
    rx: std::sync::mpsc::Receiver<GenRequest>,
    quit: Arc<AtomicBool>,
) {
    let tok = Arc::new(loaded.tok);
    let max_context = loaded.engine.max_context();
    let mut sched = Scheduler::new(
        loaded.engine,
        tok.clone(),
        loaded.stop_ids,
        app.metrics.clone(),
        app.queue.clone(),
    );
    let _ = app.ready.set(Ready {
        tok,
        template: loaded.template,
        max_context,
    });
    loop {
        if quit.load(Ordering::SeqCst) {
            sched.cancel_all("the server stopped");
            return;
        }
        if sched.is_idle() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => sched.submit(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            sched.submit(r);
        }
        if app.cancel_all.load(Ordering::SeqCst) {
            sched.cancel_all("the server is shutting down: the grace period is over");
            continue;
        }
        sched.step();
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Run the server until SIGTERM/SIGINT. `load` runs on the engine thread
/// (the server answers `/health` with 503 until it returns); `on_listen`
/// gets the bound address. A load failure ends the server with its error.
pub fn serve<E, F>(opts: ServeOptions, load: F, on_listen: impl FnOnce(SocketAddr)) -> Result<()>
where
    E: Engine + 'static,
    F: FnOnce() -> Result<Loaded<E>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(serve_async(opts, load, on_listen))
}

async fn serve_async<E, F>(
    opts: ServeOptions,
    load: F,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<()>
where
    E: Engine + 'static,
    F: FnOnce() -> Result<Loaded<E>> + Send + 'static,
{
    let addr = format!("{}:{}", opts.host, opts.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::invalid(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::invalid(format!("cannot read the bound address: {e}")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let app = Arc::new(App {
        opts: opts.clone(),
        ready: OnceLock::new(),
        tx,
        queue: Arc::new(AtomicUsize::new(0)),
        metrics: Arc::new(Metrics::default()),
        shutting_down: AtomicBool::new(false),
        cancel_all: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });
    let quit = Arc::new(AtomicBool::new(false));
    let (load_err_tx, load_err_rx) = tokio::sync::oneshot::channel::<Error>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    {
        let app = app.clone();
        let quit = quit.clone();
        std::thread::Builder::new()
            .name("wgllm-engine".into())
            .spawn(move || {
                match load() {
                    Ok(l) => engine_thread(app, l, rx, quit),
                    Err(e) => {
                        let _ = load_err_tx.send(e);
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::invalid(format!("cannot start the engine thread: {e}")))?;
    }
    on_listen(local);

    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(opts.max_body_bytes))
        .with_state(app.clone());

    let load_error: Arc<std::sync::Mutex<Option<Error>>> = Default::default();
    let shutdown = {
        let app = app.clone();
        let load_error = load_error.clone();
        let grace = opts.grace;
        async move {
            tokio::select! {
                _ = stop_signal() => {
                    eprintln!(
                        "wgllm serve: stopping: no new requests; in-flight ones get {} s",
                        grace.as_secs_f64()
                    );
                }
                Ok(e) = load_err_rx => {
                    *load_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            }
            app.shutting_down.store(true, Ordering::SeqCst);
            let app2 = app.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                app2.cancel_all.store(true, Ordering::SeqCst);
            });
        }
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(shutdown);
    // The graceful shutdown waits for open connections; one that never
    // closes (an idle client that holds it) must not hold the exit past
    // the grace period and a little more for the cancelled answers.
    let hard = {
        let app = app.clone();
        let grace = opts.grace;
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if app.shutting_down.load(Ordering::SeqCst) {
                    break;
                }
            }
            tokio::time::sleep(grace + Duration::from_secs(2)).await;
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| Error::invalid(format!("the HTTP server failed: {e}")))?,
        _ = hard => {}
    }
    quit.store(true, Ordering::SeqCst);
    drop(app);
    // Let the engine thread finish its step and drop the model before the
    // process exits (a device torn down mid-submission can crash at exit).
    let _ =
        tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(10))).await;
    if let Some(e) = load_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    Ok(())
}

/// A loaded [`crate::model::Model`] with `slots` sequence slots
/// ([`crate::model::ModelOptions::slots`]) is the scheduler's engine.
impl Engine for crate::model::Model {
    fn slots(&self) -> usize {
        crate::model::Model::slots(self)
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn slot_position(&self, slot: usize) -> usize {
        crate::model::Model::slot_position(self, slot)
    }
    fn slot_truncate(&mut self, slot: usize, n: usize) -> Result<()> {
        crate::model::Model::slot_truncate(self, slot, n)
    }
    fn prefill_slot(&mut self, slot: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        crate::model::Model::prefill_slot(self, slot, tokens)
    }
    fn decode_batch(&mut self, steps: &[(usize, u32)]) -> Result<Vec<Vec<f32>>> {
        crate::model::Model::decode_batch(self, steps)
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    /// Every slot has a GPU sampler over its row of the batch logits.
    fn device_sampling(&self) -> bool {
        true
    }
    fn begin_slot_sampling(
        &mut self,
        slot: usize,
        d: &crate::sampling::Draw,
        draws: &[f32],
    ) -> Result<()> {
        crate::model::Model::begin_slot_sampled(self, slot, d, draws)
    }
    fn decode_picks(&mut self, steps: &[scheduler::SlotStep]) -> Result<scheduler::BatchPicks> {
        crate::model::Model::decode_batch_picks(self, steps)
    }
}
