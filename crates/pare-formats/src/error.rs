//! The one error type of this crate.
//!
//! Every variant that concerns a file carries its path, so that the one-line `Display` tells a
//! user which file is broken and how, without a backtrace: checkpoints come from users, and a
//! corrupt one must be reported, never panicked on.

use std::path::{Path, PathBuf};

use crate::gguf::GgmlType;

/// Everything that can go wrong while reading or writing a checkpoint, tokenizer or template.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The operating system refused to open, read, map or write a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file's bytes do not follow its format (bad magic, truncation, impossible sizes...).
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// A GGUF metadata key that the caller needs is absent.
    #[error("{}: metadata key `{key}` is missing", path.display())]
    MissingKey { path: PathBuf, key: String },

    /// A GGUF metadata key holds a value of another type than the caller needs.
    #[error("{}: metadata key `{key}` is {found}, expected {expected}", path.display())]
    WrongType { path: PathBuf, key: String, expected: &'static str, found: String },

    /// No tensor of that name exists in the checkpoint.
    #[error("{}: no tensor named `{name}`", path.display())]
    TensorNotFound { path: PathBuf, name: String },

    /// The tensor exists but its element type cannot be turned into a candle tensor.
    #[error("{}: tensor `{name}` has unsupported type {dtype}", path.display())]
    UnsupportedTensorType { path: PathBuf, name: String, dtype: String },

    /// A GGUF tensor is stored in a ggml type candle cannot read (the i-quants, ternary and FP4
    /// types), or, for `qtensor`, in a plain type candle's quantized tensors cannot hold.
    #[error(
        "{}: tensor `{name}`: unsupported ggml type {} ({ggml_type})",
        path.display(), ggml_type.id()
    )]
    UnsupportedGgmlType { path: PathBuf, name: String, ggml_type: GgmlType },

    /// A safetensors file (or shard index) is malformed.
    #[error("{}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },

    /// A JSON side file (tokenizer.json, tokenizer_config.json, an index) is malformed.
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Tokenizer metadata is inconsistent or names an unsupported tokenizer.
    #[error("{}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },

    /// The tokenizers library failed to encode, decode or serialize.
    #[error("tokenizer: {0}")]
    Tokenize(String),

    /// A tokenizer cannot be described by GGUF `tokenizer.*` keys the way llama.cpp's converter
    /// would describe it.
    #[error("GGUF tokenizer: {0}")]
    GgufTokenizer(String),

    /// A chat template failed to compile or render (including its own `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),

    /// candle failed while building a tensor from bytes that were already validated.
    #[error("{context}: {}", source.to_string().replace('\n', ": "))]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, FormatError>;

impl FormatError {
    /// Shorthand for the most common failure: a file whose contents are malformed.
    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        FormatError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        FormatError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn tokenizer(path: &Path, reason: impl Into<String>) -> Self {
        FormatError::Tokenizer { path: path.to_path_buf(), reason: reason.into() }
    }

    /// Wraps a candle error without the backtrace candle attaches when `RUST_BACKTRACE` is set,
    /// which would break the one-line message.
    pub(crate) fn candle(context: impl Into<String>, mut source: candle_core::Error) -> Self {
        while let candle_core::Error::WithBacktrace { inner, .. } = source {
            source = *inner;
        }
        FormatError::Candle { context: context.into(), source }
    }
}
