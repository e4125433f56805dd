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
}
