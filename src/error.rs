//! Error type shared by the library. Every error names the file, tensor or
//! field involved and what was expected, so a user can act on it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no GPU adapter found ({0}). Install a GPU driver with Vulkan, Metal or DX12 support, or on Debian/Ubuntu the software Vulkan driver: `sudo apt-get install mesa-vulkan-drivers`")]
    NoAdapter(String),

    #[error("adapter selection: {0}")]
    AdapterSelect(String),

    #[error("could not create a device on adapter '{adapter}': {msg}")]
    Device { adapter: String, msg: String },

    #[error("GPU error in {what}: {msg}")]
    Gpu { what: String, msg: String },

    #[error("{path}: {msg}")]
    Io {
        path: PathBuf,
        msg: String,
        #[source]
        source: Option<std::io::Error>,
    },

    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },

    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },

    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    #[error("{0}")]
    Invalid(String),

    /// An error and the change of settings that would avoid it, kept apart
    /// so each front end can name the settings its own way
    /// ([`Error::render`]): the library knows settings, not flags or form
    /// fields.
    #[error("{error} ({hint})")]
    Hint {
        #[source]
        error: Box<Error>,
        hint: Hint,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        let path = path.into();
        Error::Io {
            msg: e.to_string(),
            path,
            source: Some(e),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// This error with `hint` (what to change) after it.
    pub fn hint(self, hint: Hint) -> Self {
        Error::Hint {
            error: Box::new(self),
            hint,
        }
    }

    /// The settings this error's hints name, outermost first.
    pub fn settings(&self) -> Vec<Setting> {
        match self {
            Error::Hint { error, hint } => {
                let mut v = hint.settings().collect::<Vec<_>>();
                v.extend(error.settings());
                v
            }
            _ => Vec::new(),
        }
    }

    /// The message with every setting named by `names` (the CLI's flags,
    /// the web page's fields); `Display` is `render(&Plain)`.
    pub fn render(&self, names: &dyn SettingNames) -> String {
        match self {
            Error::Hint { error, hint } => {
                format!("{} ({})", error.render(names), hint.render(names))
            }
            e => e.to_string(),
        }
    }
}

/// A setting the user chooses, which an error's [`Hint`] can ask to
/// change. Front ends name it their own way ([`SettingNames`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// The KV cache length in tokens (`ModelOptions::max_context`).
    MaxContext,
    /// New tokens to generate (`GenerateOptions::max_tokens`).
    MaxTokens,
    /// The device weight dtype (`LoadDType`: auto, native, bf16, f32).
    DType,
    /// The model: a folder, a `.gguf` file or a known model's name.
    Model,
    /// Token ids given as the input (verify's `tokens`).
    Tokens,
    /// Text given as the input, encoded by the model's tokenizer.
    Prompt,
    /// A PyTorch reference dump (verify's `reference`).
    Reference,
}

impl Setting {
    /// The setting in plain words, for [`Plain`].
    pub fn words(self) -> &'static str {
        match self {
            Setting::MaxContext => "max context",
            Setting::MaxTokens => "max tokens",
            Setting::DType => "weight dtype",
            Setting::Model => "model",
            Setting::Tokens => "token ids",
            Setting::Prompt => "prompt",
            Setting::Reference => "reference dump",
        }
    }
}

/// How a front end names settings in a [`Hint`].
pub trait SettingNames {
    /// The setting itself (`--max-context`, "max context").
    fn name(&self, s: Setting) -> String;
    /// Asking for the setting at `value` ("10 or less", "bf16").
    fn set(&self, s: Setting, value: &str) -> String {
        format!("set {} to {value}", self.name(s))
    }
}

/// Settings in plain words ([`Setting::words`]): the library's own
/// `Display`.
pub struct Plain;

impl SettingNames for Plain {
    fn name(&self, s: Setting) -> String {
        s.words().into()
    }
}

/// One piece of a [`Hint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// The setting's name.
    Name(Setting),
    /// The setting at a value: "use --max-context 10 or less" on the CLI.
    Set(Setting, String),
}

/// What to change, as text with settings in it, built with
/// [`Hint::text`], [`Hint::name`] and [`Hint::set`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hint(pub Vec<Part>);

impl Hint {
    pub fn new() -> Self {
        Hint::default()
    }
    pub fn text(mut self, t: impl Into<String>) -> Self {
        self.0.push(Part::Text(t.into()));
        self
    }
    pub fn name(mut self, s: Setting) -> Self {
        self.0.push(Part::Name(s));
        self
    }
    pub fn set(mut self, s: Setting, value: impl Into<String>) -> Self {
        self.0.push(Part::Set(s, value.into()));
        self
    }
    /// The settings named, in order.
    pub fn settings(&self) -> impl Iterator<Item = Setting> + '_ {
        self.0.iter().filter_map(|p| match p {
            Part::Text(_) => None,
            Part::Name(s) | Part::Set(s, _) => Some(*s),
        })
    }
    pub fn render(&self, names: &dyn SettingNames) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.clone(),
                Part::Name(s) => names.name(*s),
                Part::Set(s, v) => names.set(*s, v),
            })
            .collect()
    }
}

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(&Plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flags;
    impl SettingNames for Flags {
        fn name(&self, s: Setting) -> String {
            format!("--{s:?}")
        }
        fn set(&self, s: Setting, value: &str) -> String {
            format!("use {} {value}", self.name(s))
        }
    }

    #[test]
    fn a_hint_renders_its_settings_by_the_front_ends_names() {
        let e = Error::invalid("too long").hint(
            Hint::new()
                .set(Setting::MaxContext, "10 or less")
                .text(", or a smaller ")
                .name(Setting::DType),
        );
        assert_eq!(
            e.to_string(),
            "too long (set max context to 10 or less, or a smaller weight dtype)"
        );
        assert_eq!(
            e.render(&Flags),
            "too long (use --MaxContext 10 or less, or a smaller --DType)"
        );
        assert_eq!(e.settings(), [Setting::MaxContext, Setting::DType]);
        // Hints nest: the inner error renders by the same names.
        let e = e.hint(Hint::new().name(Setting::Model));
        assert_eq!(
            e.render(&Flags),
            "too long (use --MaxContext 10 or less, or a smaller --DType) (--Model)"
        );
        assert_eq!(
            e.settings(),
            [Setting::Model, Setting::MaxContext, Setting::DType]
        );
        // Other errors render as they display.
        let e = Error::invalid("plain");
        assert_eq!(e.render(&Flags), "plain");
        assert!(e.settings().is_empty());
    }
}
