//! One error type for the whole core. Each error carries a [`Kind`] that the SQL layer
//! maps to a PostgreSQL SQLSTATE, and a lowercase message with the numbers in it.

use std::fmt;

/// What went wrong, in the terms the SQL layer needs to pick a SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// A caller's argument is wrong (SQLSTATE 22023 invalid_parameter_value).
    InvalidParameter,
    /// Values in the data are wrong: NaN or negative counts, duplicate barcodes (22000).
    Data,
    /// A file is malformed, truncated or not of the expected format (22P04 bad_copy_file_format).
    FileFormat,
    /// A file or folder does not exist (58P01 undefined_file).
    FileNotFound,
    /// Reading a file failed for another reason (58030 io_error).
    Io,
    /// A size limit was exceeded (54000 program_limit_exceeded).
    Limit,
    /// Arrays of different lengths or mismatched shapes (2202E array_subscript_error / 22000).
    ArrayShape,
    /// A NULL where a value is required (22004 null_value_not_allowed).
    NullValue,
    /// A named thing does not exist: a model, a gene, a column (42704 undefined_object).
    UndefinedObject,
    /// A bug: something that cannot happen (XX000 internal_error).
    Internal,
}

/// An error with a kind, a message, and optional detail and hint lines.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidParameter, message)
    }
    pub fn data(message: impl Into<String>) -> Self {
        Self::new(Kind::Data, message)
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(Kind::FileFormat, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(Kind::ArrayShape, message)
    }
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// Prefix the message with context, e.g. the file being read.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
    /// An I/O error on `path`, with not-found told apart.
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => Kind::FileNotFound,
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData => Kind::FileFormat,
            _ => Kind::Io,
        };
        let msg = match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("could not open file \"{}\": no such file", path.display())
            }
            std::io::ErrorKind::UnexpectedEof => {
                format!("file \"{}\" is truncated", path.display())
            }
            _ => format!("could not read file \"{}\": {e}", path.display()),
        };
        Error::new(kind, msg)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<hdf5::Error> for Error {
    fn from(e: hdf5::Error) -> Self {
        Error::format(format!("hdf5: {e}"))
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::format(format!("{e}"))
    }
}

/// Shorthand: `bail!(Kind::Data, "negative count {} at cell {}", v, c)`.
#[macro_export]
macro_rules! bail {
    ($kind:expr, $($arg:tt)*) => {
        return Err($crate::error::Error::new($kind, format!($($arg)*)))
    };
}
