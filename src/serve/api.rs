//! The OpenAI wire format: request parsing and validation (every wrong field
//! is a 400 naming it), error bodies, and the response and stream-chunk JSON
//! of `/v1/chat/completions` and `/v1/completions`.

use serde_json::{json, Map, Value};

use super::scheduler::{FinishReason, TokenLogprob, Usage};
use crate::chat::ChatMessage;
use crate::sampling::SamplingParams;

/// An error answer: HTTP status plus OpenAI's error object.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }
    /// 400 about one request field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(400, "invalid_request_error", message)
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request_error", message)
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// The prompt before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Messages(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A parsed, type-checked request (limits that need the model, such as the
/// context, are checked by the server after tokenization).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub kind: Kind,
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// True when `seed` was given (else the server draws one).
    pub seeded: bool,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(n)`: log-probabilities with the top `n` alternatives.
    pub logprobs: Option<usize>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field accessors: absent and null are `None`; a wrong type is a 400.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn wrong(k: &str, want: &str, v: &Value) -> ApiError {
        ApiError::field(k, format!("`{k}`: expected {want}, got {}", type_name(v)))
    }
    fn f64(&self, k: &str) -> Result<Option<f64>, ApiError> {
        self.get(k)
            .map(|v| v.as_f64().ok_or_else(|| Self::wrong(k, "a number", v)))
            .transpose()
    }
    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        self.get(k)
            .map(|v| v.as_bool().ok_or_else(|| Self::wrong(k, "a boolean", v)))
            .transpose()
    }
    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .map(|v| v.as_i64().ok_or_else(|| Self::wrong(k, "an integer", v)))
            .transpose()
    }
    /// A non-negative count.
    fn count(&self, k: &str) -> Result<Option<usize>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::field(
                        k,
                        format!("`{k}`: expected a non-negative integer, got {v}"),
                    )
                }),
        }
    }
    fn str(&self, k: &str) -> Result<Option<&str>, ApiError> {
        self.get(k)
            .map(|v| v.as_str().ok_or_else(|| Self::wrong(k, "a string", v)))
            .transpose()
    }
}

/// Parse a request body for `kind`.
pub fn parse(kind: Kind, body: &[u8]) -> Result<Request, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(map) = &v else {
        return Err(ApiError::bad(format!(
            "the request body must be a JSON object, got {}",
            type_name(&v)
        )));
    };
    let f = Fields(map);
    let model = f.str("model")?.map(str::to_string);
    if let Some(n) = f.int("n")? {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("`n`: only 1 choice per request is supported, got {n}"),
            ));
        }
    }
    if let Some(b) = f.int("best_of")? {
        if b != 1 {
            return Err(ApiError::field(
                "best_of",
                format!("`best_of`: only 1 is supported, got {b}"),
            ));
        }
    }
    for k in ["frequency_penalty", "presence_penalty"] {
        if let Some(x) = f.f64(k)? {
            if x != 0.0 {
                return Err(ApiError::field(
                    k,
                    format!("`{k}`: not supported (only 0), got {x}"),
                ));
            }
        }
    }
    for k in ["tools", "functions", "logit_bias"] {
        let empty = match f.get(k) {
            None => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        if !empty {
            return Err(ApiError::field(k, format!("`{k}`: not supported")));
        }
    }
    let prompt = match kind {
        Kind::Chat => Prompt::Messages(parse_messages(map.get("messages"))?),
        Kind::Completion => parse_prompt(map.get("prompt"))?,
    };
    if kind == Kind::Completion && f.bool("echo")? == Some(true) {
        return Err(ApiError::field("echo", "`echo`: not supported"));
    }
    if kind == Kind::Completion && f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::field("suffix", "`suffix`: not supported"));
    }
    let max_tokens = match (f.count("max_completion_tokens")?, f.count("max_tokens")?) {
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::field(
            "max_tokens",
            "`max_tokens`: must be at least 1",
        ));
    }
    // OpenAI's default temperature is 1; 0 is greedy.
    let temperature = f.f64("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            format!("`temperature`: expected a number in [0, 2], got {temperature}"),
        ));
    }
    let top_p = f.f64("top_p")?.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::field(
            "top_p",
            format!("`top_p`: expected a number in [0, 1], got {top_p}"),
        ));
    }
    let seed = f.int("seed")?;
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Fields::wrong("stop", "a string or a list of strings", x))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(Fields::wrong("stop", "a string or a list of strings", v)),
    };
    if stop.len() > 16 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::field(
            "stop",
            "`stop`: expected at most 16 non-empty strings",
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(v) => return Err(Fields::wrong("stream_options", "an object", v)),
    };
    let logprobs = match kind {
        Kind::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.count("top_logprobs")?;
            if top.is_some_and(|n| n > 20) {
                return Err(ApiError::field(
                    "top_logprobs",
                    "`top_logprobs`: expected an integer in [0, 20]",
                ));
            }
            if top.is_some() && !on {
                return Err(ApiError::field(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            on.then(|| top.unwrap_or(0))
        }
        Kind::Completion => {
            let n = f.count("logprobs")?;
            if n.is_some_and(|n| n > 5) {
                return Err(ApiError::field(
                    "logprobs",
                    "`logprobs`: expected an integer in [0, 5]",
                ));
            }
            n
        }
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        // top_p 0 keeps only the most likely token, as the smallest
        // positive value does.
        top_p: if top_p == 0.0 {
            f32::MIN_POSITIVE
        } else {
            top_p as f32
        },
        seed: seed.map(|s| s as u64).unwrap_or(0),
        repeat_penalty: 1.0,
        ..Default::default()
    };
    Ok(Request {
        kind,
        model,
        prompt,
        max_tokens,
        sampling,
        seeded: seed.is_some(),
        stop,
        stream,
        include_usage,
        logprobs,
    })
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(a)) = v else {
        return Err(ApiError::field(
            "messages",
            "`messages`: expected a non-empty array of {role, content} objects",
        ));
    };
    if a.is_empty() {
        return Err(ApiError::field("messages", "`messages`: must not be empty"));
    }
    let mut out = Vec::new();
    for (i, m) in a.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Value::Object(o) = m else {
            return Err(ApiError::field(
                &p,
                format!("`{p}`: expected an object, got {}", type_name(m)),
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r))
                if ["system", "developer", "user", "assistant"].contains(&r.as_str()) =>
            {
                // The templates know `system`; OpenAI's newer name for it.
                if r == "developer" {
                    "system".to_string()
                } else {
                    r.clone()
                }
            }
            Some(v) => {
                return Err(ApiError::field(
                    &format!("{p}.role"),
                    format!(
                        "`{p}.role`: expected one of system, developer, user, assistant, got {v}"
                    ),
                ))
            }
            None => {
                return Err(ApiError::field(
                    &format!("{p}.role"),
                    format!("`{p}.role`: missing"),
                ))
            }
        };
        let content = match o.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => s.push_str(t),
                        _ => {
                            return Err(ApiError::field(
                                &format!("{p}.content[{j}]"),
                                format!("`{p}.content[{j}]`: only {{\"type\": \"text\", \"text\": ...}} parts are supported"),
                            ))
                        }
                    }
                }
                s
            }
            Some(v) => {
                return Err(ApiError::field(
                    &format!("{p}.content"),
                    format!(
                        "`{p}.content`: expected a string or an array of text parts, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let want = "`prompt`: expected a string, a list of one string, or a list of token ids";
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match v {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_array() => {
            let inner = a[0].as_array().map(Vec::as_slice).unwrap_or_default();
            ids(inner)
                .map(Prompt::Tokens)
                .ok_or_else(|| ApiError::field("prompt", want))
        }
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(|x| !x.is_number()) => {
            Err(ApiError::field(
                "prompt",
                format!(
                    "`prompt`: {} prompts in one request are not supported (send one request per prompt)",
                    a.len()
                ),
            ))
        }
        Some(Value::Array(a)) if !a.is_empty() => ids(a)
            .map(Prompt::Tokens)
            .ok_or_else(|| ApiError::field("prompt", want)),
        _ => Err(ApiError::field("prompt", want)),
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Chat's `logprobs.content` entries.
pub fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry =
        |token: &str, lp: f64| json!({"token": token, "logprob": lp, "bytes": token.as_bytes()});
    Value::Array(
        lps.iter()
            .map(|t| {
                let mut e = entry(&t.token, t.logprob);
                e["top_logprobs"] =
                    Value::Array(t.top.iter().map(|x| entry(&x.token, x.logprob)).collect());
                e
            })
            .collect(),
    )
}

/// The legacy completions `logprobs` object; `base` is the text offset of
/// the first entry's chunk (offsets are into the whole completion).
pub fn completion_logprobs(lps: &[TokenLogprob]) -> Value {
    json!({
        "tokens": lps.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| {
            let mut m = Map::new();
            for x in &t.top {
                m.insert(x.token.clone(), json!(x.logprob));
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": lps.iter().map(|t| t.text_offset).collect::<Vec<_>>(),
    })
}

/// What identifies one response in its JSON.
pub struct Meta<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

/// A whole (non-streamed) response.
pub fn response(
    kind: Kind,
    m: &Meta,
    text: &str,
    lps: Option<&[TokenLogprob]>,
    finish: FinishReason,
    usage: &Usage,
) -> Value {
    match kind {
        Kind::Chat => json!({
            "id": m.id, "object": "chat.completion", "created": m.created, "model": m.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": lps.map(|l| json!({"content": chat_logprobs(l)})),
                "finish_reason": finish.as_str(),
            }],
            "usage": usage_json(usage),
        }),
        Kind::Completion => json!({
            "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": lps.map(completion_logprobs),
                "finish_reason": finish.as_str(),
            }],
            "usage": usage_json(usage),
        }),
    }
}

/// One stream chunk. `first` adds chat's `role`; `finish` ends the choice.
pub fn chunk(
    kind: Kind,
    m: &Meta,
    text: Option<&str>,
    first: bool,
    lps: Option<&[TokenLogprob]>,
    finish: Option<FinishReason>,
    include_usage: bool,
) -> Value {
    let mut v = match kind {
        Kind::Chat => {
            let mut delta = Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({
                "id": m.id, "object": "chat.completion.chunk", "created": m.created, "model": m.model,
                "choices": [{
                    "index": 0,
                    "delta": Value::Object(delta),
                    "logprobs": lps.map(|l| json!({"content": chat_logprobs(l)})),
                    "finish_reason": finish.map(FinishReason::as_str),
                }],
            })
        }
        Kind::Completion => json!({
            "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
            "choices": [{
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": lps.map(completion_logprobs),
                "finish_reason": finish.map(FinishReason::as_str),
            }],
        }),
    };
    if include_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The last chunk with `stream_options.include_usage`: no choices, usage.
pub fn usage_chunk(kind: Kind, m: &Meta, usage: &Usage) -> Value {
    json!({
        "id": m.id,
        "object": if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": m.created, "model": m.model,
        "choices": [],
        "usage": usage_json(usage),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: Kind, body: &str) -> ApiError {
        parse(kind, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn parses_a_chat_request() {
        let r = parse(
            Kind::Chat,
            br#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]}],
                "max_completion_tokens": 7, "temperature": 0, "stop": "x", "stream": true,
                "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 3,
                "seed": -1, "n": 1, "frequency_penalty": 0}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompt,
            Prompt::Messages(vec![
                ChatMessage::system("be brief"),
                ChatMessage::user("hi!")
            ])
        );
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.stop, vec!["x"]);
        assert!(r.stream && r.include_usage && r.seeded);
        assert_eq!(r.logprobs, Some(3));
        assert_eq!(r.sampling.seed, u64::MAX);
    }

    #[test]
    fn parses_completion_prompts_and_defaults() {
        let r = parse(Kind::Completion, br#"{"prompt": "abc"}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Text("abc".into()));
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.max_tokens, None);
        assert!(!r.seeded && !r.stream && r.logprobs.is_none());
        let r = parse(
            Kind::Completion,
            br#"{"prompt": [1, 2, 3], "logprobs": 2, "stop": ["a", "b"]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(r.stop, vec!["a", "b"]);
        let r = parse(Kind::Completion, br#"{"prompt": ["x"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Text("x".into()));
    }

    #[test]
    fn every_bad_field_is_a_400_naming_it() {
        let check = |kind: Kind, body: &str, want: &str| {
            let e = err(kind, body);
            assert_eq!(e.status, 400, "{body}");
            assert!(e.message.contains(want), "{body}: {}", e.message);
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        };
        for (kind, body, want) in [
            (Kind::Chat, "{", "not valid JSON"),
            (Kind::Chat, "[1]", "must be a JSON object, got an array"),
            (
                Kind::Chat,
                r#"{"messages": []}"#,
                "`messages`: must not be empty",
            ),
            (Kind::Chat, r#"{"messages": "hi"}"#, "`messages`: expected"),
            (
                Kind::Chat,
                r#"{"messages": [{"role": "bot", "content": "x"}]}"#,
                "`messages[0].role`",
            ),
            (
                Kind::Chat,
                r#"{"messages": [{"role": "user", "content": 3}]}"#,
                "`messages[0].content`",
            ),
            (Kind::Completion, r#"{"prompt": 5}"#, "`prompt`"),
            (Kind::Completion, r#"{"prompt": ["a", "b"]}"#, "2 prompts"),
            (
                Kind::Completion,
                r#"{"prompt": "a", "logprobs": 9}"#,
                "[0, 5]",
            ),
            (
                Kind::Completion,
                r#"{"prompt": "a", "echo": true}"#,
                "`echo`",
            ),
        ] {
            check(kind, body, want);
        }
        // A valid chat request but for one field.
        for (field, want) in [
            (r#""n": 2"#, "`n`: only 1"),
            (
                r#""temperature": "hot""#,
                "`temperature`: expected a number, got a string",
            ),
            (r#""temperature": 3"#, "[0, 2]"),
            (
                r#""max_tokens": -1"#,
                "`max_tokens`: expected a non-negative integer",
            ),
            (r#""max_tokens": 0"#, "at least 1"),
            (r#""stop": 5"#, "`stop`"),
            (r#""stream": "yes""#, "`stream`: expected a boolean"),
            (r#""top_logprobs": 2"#, "needs `logprobs: true`"),
        ] {
            let body = format!(r#"{{"messages": [{{"role": "user", "content": "x"}}], {field}}}"#);
            check(Kind::Chat, &body, want);
        }
    }
}
