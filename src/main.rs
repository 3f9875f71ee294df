//! CLI entry: parse, dispatch, print one-line errors with the right exit status.

use clap::Parser;

fn main() {
    dreambooth::device::keep_freed_memory();
    let cli = dreambooth::cli::Cli::parse();
    match dreambooth::cli::run(cli) {
        Ok(()) => {}
        Err(err) => {
            eprintln!("error: {}", dreambooth::error::one_line(&err));
            std::process::exit(dreambooth::error::exit_code(&err));
        }
    }
}
