//! CLI entry: parse, dispatch, print one-line errors with the right exit status.

use clap::Parser;

fn main() {
    dreambooth::device::keep_freed_memory();
    dreambooth::error::install_panic_hook();
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
