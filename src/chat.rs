//! Chat templates: render a conversation into the prompt text a model was
//! trained on, the way transformers' `apply_chat_template` does.
//!
//! Templates are Jinja2 programs (from `tokenizer_config.json`,
//! `chat_template.jinja`, or a GGUF's `tokenizer.chat_template`), rendered
//! here with minijinja set up like transformers' environment:
//! `trim_blocks` and `lstrip_blocks` on, loop controls (`break`/`continue`),
//! Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...,
//! from minijinja-contrib's pycompat), a `tojson` filter that matches
//! `json.dumps(ensure_ascii=False)` (no HTML escaping, Python separators),
//! `raise_exception(msg)`, `strftime_now(fmt)` (UTC here; transformers uses
//! local time), and `tools` / `documents` passed as `none` so that both
//! `{% if tools %}` and `{% if tools is not none %}` see "no tools".
//! transformers' `{% generation %}` block tag is accepted and renders its body.

use std::borrow::Cow;
use std::path::Path;

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::VocabSpec;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Render `messages` with a Jinja chat template, like transformers'
/// `tokenizer.apply_chat_template(messages, tokenize=False,
/// add_generation_prompt=...)` with `bos_token` / `eos_token` set.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let env = environment();
    let source = accept_generation_tags(template);
    let tmpl = env
        .template_from_str(&source)
        .map_err(|e| Error::invalid(format!("chat template does not parse: {}", describe(&e))))?;
    let ctx = minijinja::context! {
        messages => Value::from(Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
        tools => Value::from(()),
        documents => Value::from(()),
    };
    tmpl.render(ctx)
        .map_err(|e| Error::invalid(format!("chat template: {}", describe(&e))))
}

/// A chat template with the special tokens it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        render_chat(
            &self.template,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
    }

    /// From a Hugging Face model folder: the template from
    /// `chat_template.jinja` if present, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates of which
    /// `default` is used), else `chat_template.json`; `bos_token` and
    /// `eos_token` from `tokenizer_config.json` (absent or null → "").
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            std::fs::read(&p).map(Some).map_err(|e| Error::io(&p, e))
        };
        Self::from_files(dir, &|name| read(name))
    }

    /// [`ChatTemplate::from_dir`] over files held in memory: `file(name)`
    /// gives a file's bytes, `None` when the folder has no such file
    /// (`dir` labels errors).
    pub fn from_files(dir: &Path, file: &dyn Fn(&str) -> Result<Option<Vec<u8>>>) -> Result<Self> {
        let json = |name: &str| -> Result<Option<serde_json::Value>> {
            let path = dir.join(name);
            file(name)?
                .map(|b| {
                    serde_json::from_slice(&b).map_err(|e| Error::Json {
                        path: path.clone(),
                        msg: e.to_string(),
                    })
                })
                .transpose()
        };
        let config_path = dir.join("tokenizer_config.json");
        let config = json("tokenizer_config.json")?.unwrap_or(serde_json::Value::Null);
        let jinja = dir.join("chat_template.jinja");
        let template = if let Some(b) = file("chat_template.jinja")? {
            String::from_utf8(b).map_err(|e| Error::Io {
                path: jinja.clone(),
                msg: format!("not UTF-8: {e}"),
                source: None,
            })?
        } else if let Some(t) = template_field(&config, &config_path)? {
            t
        } else {
            let path = dir.join("chat_template.json");
            let from_json = match json("chat_template.json")? {
                Some(v) => template_field(&v, &path)?,
                None => None,
            };
            from_json.ok_or_else(|| Error::Io {
                path: dir.to_path_buf(),
                msg: "no chat template: none of chat_template.jinja, tokenizer_config.json \
                      `chat_template`, chat_template.json"
                    .into(),
                source: None,
            })?
        };
        Ok(ChatTemplate {
            template,
            bos_token: special_token_field(&config, "bos_token", &config_path)?,
            eos_token: special_token_field(&config, "eos_token", &config_path)?,
        })
    }

    /// From GGUF tokenizer metadata (`tokenizer.chat_template`, and the bos /
    /// eos token strings by id).
    pub fn from_vocab_spec(spec: &VocabSpec) -> Result<Self> {
        let template = spec
            .chat_template
            .clone()
            .ok_or_else(|| Error::invalid("the GGUF file has no tokenizer.chat_template"))?;
        let token = |id: Option<u32>| id.and_then(|i| spec.token(i)).unwrap_or("").to_string();
        Ok(ChatTemplate {
            template,
            bos_token: token(spec.bos),
            eos_token: token(spec.eos),
        })
    }
}

/// `chat_template` as a string or a list of `{name, template}`.
fn template_field(config: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    let bad = |msg: String| Error::Config {
        path: path.to_path_buf(),
        field: "chat_template".into(),
        msg,
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(|n| n.as_str()).unwrap_or("");
                let template = item.get("template").and_then(|t| t.as_str());
                if name == "default" {
                    return template
                        .map(|t| Some(t.to_string()))
                        .ok_or_else(|| bad("the `default` entry has no string `template`".into()));
                }
                names.push(name.to_string());
            }
            Err(bad(format!(
                "a list of named templates without `default` (names: {})",
                names.join(", ")
            )))
        }
        Some(other) => Err(bad(format!(
            "expected a string or a list of {{name, template}}, got {other}"
        ))),
    }
}

/// A special token given as a string, as `{"content": ...}` or null.
fn special_token_field(config: &serde_json::Value, field: &str, path: &Path) -> Result<String> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(v) => match v.get("content").and_then(|c| c.as_str()) {
            Some(s) => Ok(s.to_string()),
            None => Err(Error::Config {
                path: path.to_path_buf(),
                field: field.into(),
                msg: format!("expected a string or {{\"content\": ...}}, got {v}"),
            }),
        },
    }
}

/// The error with its chain of causes (minijinja puts the template line in
/// the detail, and `raise_exception` messages in the cause).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| {
        // std's SystemTime panics on wasm32-unknown-unknown: the browser's
        // clock there.
        #[cfg(not(target_arch = "wasm32"))]
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        #[cfg(target_arch = "wasm32")]
        let secs = (js_sys::Date::now() / 1000.0) as i64;
        strftime_utc(&fmt, secs)
    });
    env
}

/// transformers' `{% generation %}...{% endgeneration %}` (marks assistant
/// text for masks) renders its body; minijinja does not know the tag, so
/// turn it into `{% if true %}...{% endif %}`, keeping whitespace control.
fn accept_generation_tags(template: &str) -> Cow<'_, str> {
    if !template.contains("generation") {
        return Cow::Borrowed(template);
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return Cow::Owned(out);
        };
        let inner = &tag[2..end];
        let (lmark, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, rmark) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lmark} if true {rmark}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lmark} endif {rmark}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<i64> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(s) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson separators must be two strings, got {}", s.len()),
            ))
        }
        // Python's defaults: ", " without indent, "," with it.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    // Python treats a negative indent as 0; a huge one would only exhaust
    // memory, so it is refused.
    if let Some(i) = indent.filter(|&i| i > 4096) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson indent {i}: expected at most 4096"),
        ));
    }
    let opts = JsonOpts {
        indent: indent.map(|i| " ".repeat(i.max(0) as usize)),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    py_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn py_json(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&py_float(f));
            }
        }
        ValueKind::String => py_json_str(v.as_str().unwrap_or(""), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                py_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                let key = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or("").to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
                    _ => k.to_string(),
                };
                py_json_str(&key, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                py_json(&v.get_item(k)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {kind}"),
            ))
        }
    }
    Ok(())
}

/// A JSON string as Python's json module writes it.
fn py_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (what json.dumps writes): shortest round-trip
/// digits, positional for exponents -4..16, else `1.5e+20` style.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}"); // e.g. "1.5e20", "-1e-5"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            s + ".0"
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// A small `strftime` for `strftime_now` (UTC): %Y %y %m %d %e %H %I %M %S
/// %p %j %a %A %b %B %%, plus glibc's `%-d`-style no-padding flag.
fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday (index 3)
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let pad = if spec == Some('-') {
            spec = chars.next();
            false
        } else {
            true
        };
        let num = |n: i64, width: usize| {
            if pad {
                format!("{n:0width$}")
            } else {
                n.to_string()
            }
        };
        let s = match spec {
            Some('Y') => year.to_string(),
            Some('y') => num(year.rem_euclid(100), 2),
            Some('m') => num(month, 2),
            Some('d') => num(day, 2),
            Some('e') => format!("{day:>2}"),
            Some('H') => num(hour, 2),
            Some('I') => num(hour12, 2),
            Some('M') => num(minute, 2),
            Some('S') => num(second, 2),
            Some('p') => (if hour < 12 { "AM" } else { "PM" }).into(),
            Some('j') => num(yday, 3),
            Some('a') => DAYS[weekday as usize][..3].into(),
            Some('A') => DAYS[weekday as usize].into(),
            Some('b') | Some('h') => MONTHS[(month - 1) as usize][..3].into(),
            Some('B') => MONTHS[(month - 1) as usize].into(),
            Some('%') => "%".into(),
            Some(other) => format!("%{other}"),
            None => "%".into(),
        };
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_renders() {
        let msgs = [ChatMessage::user("hi")];
        let s = render_chat(CHATML, &msgs, true, "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let s = render_chat(CHATML, &msgs, false, "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn tools_and_documents_are_none() {
        let t = "{% if tools %}A{% endif %}{% if tools is not none %}B{% endif %}\
                 {% if documents is none %}C{% endif %}{{ bos_token }}|{{ eos_token }}";
        let s = render_chat(t, &[], false, "<s>", "</s>").unwrap();
        assert_eq!(s, "C<s>|</s>");
    }

    #[test]
    fn raise_exception_message_reaches_the_error() {
        let t = "{{ raise_exception('roles must alternate') }}";
        let e = render_chat(t, &[], false, "", "").unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn python_methods_and_tojson() {
        let msgs = [ChatMessage::user("  Héllo \"x\"\n ")];
        let t = "{{ messages[0].content.strip() }}|{{ messages[0] | tojson }}|\
                 {{ messages[0].content.strip().startswith('H') }}|{{ {'b': 1.0, 'a': [1e20, 1e-5, none, true]} | tojson(sort_keys=true) }}";
        let s = render_chat(t, &msgs, false, "", "").unwrap();
        assert_eq!(
            s,
            "Héllo \"x\"|{\"role\": \"user\", \"content\": \"  Héllo \\\"x\\\"\\n \"}|True|\
             {\"a\": [1e+20, 1e-05, null, true], \"b\": 1.0}"
        );
        let s = render_chat("{{ {'a': [1, 2]} | tojson(indent=2) }}", &[], false, "", "").unwrap();
        assert_eq!(s, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
        // Python: a negative indent is 0; a huge one is refused, not allocated.
        let s = render_chat("{{ [1] | tojson(indent=-1) }}", &[], false, "", "").unwrap();
        assert_eq!(s, "[\n1\n]");
        let e = render_chat("{{ [1] | tojson(indent=10**12) }}", &[], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tojson indent 1000000000000"), "{e}");
    }

    #[test]
    fn generation_tag_renders_its_body() {
        let t = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let s = render_chat(t, &[ChatMessage::assistant("x")], false, "", "").unwrap();
        assert_eq!(s, "x");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime_utc("%d %b %Y, %A %j %I%p %-m/%-d", t),
            "29 Feb 2024, Thursday 060 01PM 2/29"
        );
        assert_eq!(strftime_utc("%e %B %y %%", 0), " 1 January 70 %");
    }

    #[test]
    fn py_float_matches_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5e-7, "-2.5e-07"),
            (123.456, "123.456"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn template_from_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "special": true}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        assert_eq!(
            (t.bos_token.as_str(), t.eos_token.as_str()),
            ("<s>", "</s>")
        );
        assert_eq!(t.render(&[], false).unwrap(), "D<s>");
        // chat_template.jinja wins over the config field.
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "J</s>");

        let empty = tempfile::tempdir().unwrap();
        let e = ChatTemplate::from_dir(empty.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no chat template"), "{e}");
    }
}
