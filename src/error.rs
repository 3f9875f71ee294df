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

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "an unknown panic".into())
}

/// libtorch's own message inside a panic of tch (its infallible calls unwrap a
/// `TchError::Torch`): the first line, without tch's wrapping or the C++
/// backtrace. None when the panic did not come from libtorch.
pub fn torch_failure(panic_text: &str) -> Option<String> {
    let start = panic_text.find("Torch(\"").map(|i| i + "Torch(\"".len()).or_else(|| {
        panic_text.find("Internal torch error: ").map(|i| i + "Internal torch error: ".len())
    })?;
    let rest = &panic_text[start..];
    // The Debug form escapes the newline before libtorch's "Exception raised from ..." trace.
    let end = [rest.find("\\n"), rest.find('\n'), rest.rfind("\")")].into_iter().flatten().min().unwrap_or(rest.len());
    let message = rest[..end].replace("\\\"", "\"").replace("\\'", "'");
    Some(message.trim().trim_end_matches('.').to_string())
}

/// Whether libtorch's message says an allocation failed (CUDA or CPU).
pub fn is_out_of_memory(torch_message: &str) -> bool {
    let m = torch_message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory") || m.contains("not enough memory")
}

/// A panic as one sentence for the user: libtorch failures say what failed
/// (allocation failures how to need less memory); anything else is a bug.
pub fn panic_sentence(payload: &(dyn std::any::Any + Send), doing: &str) -> String {
    let text = panic_text(payload);
    match torch_failure(&text) {
        Some(m) if is_out_of_memory(&m) => format!(
            "out of memory while {doing} ({m}); choose a smaller preset (`dreambooth presets`), a lower batch_size or \
             resolution, or turn on gradient_checkpointing"
        ),
        Some(m) => format!("libtorch failed while {doing}: {m}"),
        None => format!("internal error while {doing} (a bug; please report it): {text}"),
    }
}

/// A panic caught at a boundary, as an error (exit status 1).
pub fn from_panic(payload: Box<dyn std::any::Any + Send>, doing: &str) -> anyhow::Error {
    anyhow::anyhow!(panic_sentence(payload.as_ref(), doing))
}

/// Runs `f`, turning a panic into an error (libtorch's failures, CUDA
/// out-of-memory above all, reach Rust as panics of tch).
pub fn catch_panics<T>(doing: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(from_panic(payload, doing)),
    }
}

/// Installs a panic hook that stays silent for libtorch failures (the caller
/// reports them as one sentence; `DREAMBOOTH_DEBUG=1` shows libtorch's whole
/// report) and prints the usual report for anything else.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if torch_failure(&panic_text(info.payload())).is_some() && std::env::var_os("DREAMBOOTH_DEBUG").is_none() {
            return;
        }
        default(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_messages_come_out_of_tch_panics() {
        let cuda = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 2.00 GiB. \
                    GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.\\nException raised from malloc at \
                    /pytorch/c10/cuda/CUDACachingAllocator.cpp:1234 (most recent call first):\\nframe #0: ...\")";
        let m = torch_failure(cuda).unwrap();
        assert_eq!(m, "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free");
        assert!(is_out_of_memory(&m));
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:117] data. \
                   DefaultCPUAllocator: can't allocate memory: you tried to allocate 4503599627370496 bytes. Error code 12 (Cannot allocate memory)\")";
        assert!(is_out_of_memory(&torch_failure(cpu).unwrap()));
        assert_eq!(torch_failure("index out of bounds: the len is 3"), None);
    }

    #[test]
    fn a_panic_becomes_one_sentence() {
        let oom = catch_panics("training step 3", || -> anyhow::Result<()> {
            panic!("called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to allocate 20.00 MiB\")")
        });
        let text = one_line(&oom.unwrap_err());
        assert!(text.starts_with("out of memory while training step 3 (CUDA out of memory. Tried to allocate 20.00 MiB)"), "{text}");
        let bug = catch_panics("exporting", || -> anyhow::Result<()> { panic!("index out of bounds") });
        assert!(one_line(&bug.unwrap_err()).contains("internal error while exporting"));
    }
}
