//! CLI entry: parse, dispatch, print one-line errors with the right exit status.

use clap::Parser;

fn main() {
    dreambooth::device::keep_freed_memory();
    dreambooth::error::install_panic_hook();
    // Past a file-size limit (`ulimit -f`, quota-like limits on shared servers) the
    // kernel would kill us with SIGXFSZ in the middle of a checkpoint; ignored, the
    // write fails with EFBIG and ends as one sentence, like a full disk.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = dreambooth::cli::Cli::parse();
    // libtorch failures (CUDA out of memory above all) reach us as panics of tch:
    // they end as one sentence and exit status 1 like every other error.
    match dreambooth::error::catch_panics("running the command", || dreambooth::cli::run(cli)) {
        Ok(()) => {}
        Err(err) => {
            eprintln!("error: {}", dreambooth::error::one_line(&err));
            std::process::exit(dreambooth::error::exit_code(&err));
        }
    }
}
