//! Errors the user must be able to tell apart by exit status: a usage or config
//! mistake (exit 2) versus anything else (exit 1).

/// A mistake in how the program was called or configured: a flag value, a config
/// key, a size the model cannot take. `main` exits with status 2 for these.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Shorthand: `bail_usage!("--width {w} is not a multiple of {f}")`.
#[macro_export]
macro_rules! bail_usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::UsageError(format!($($arg)*))))
    };
}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Exit status for an error: 2 for usage/config errors, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.downcast_ref::<UsageError>().is_some()) { 2 } else { 1 }
}

/// The error as one sentence: the outermost context first, causes after it,
/// joined so the line names the file or key and says what went wrong.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string().trim().trim_end_matches('.').to_string();
        if s.is_empty() || parts.iter().any(|p| p.contains(&s)) {
            continue;
        }
        parts.push(s);
    }
    let mut line = parts.join(": ");
    line.push('.');
    line
}
