//! The tmux end-to-end run (tests/e2e_tmux.sh) as part of the suite: the wizard
//! driven by keystrokes, a detached trainer, a killed tmux server (the dropped SSH
//! connection), attach, resize and SIGTERM. The script skips itself, with a
//! message, where tmux is not installed.

use std::process::Command;

#[test]
fn wizard_detach_dropped_terminal_attach_in_tmux() {
    run_script(None);
}

/// The same flow with an SDXL model chosen in the wizard.
#[test]
fn the_same_in_tmux_with_an_sdxl_model() {
    run_script(Some(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sdxl")));
}

fn run_script(model: Option<&str>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_tmux.sh");
    let mut command = Command::new("bash");
    command.arg(script).arg(env!("CARGO_BIN_EXE_dreambooth")).env("OMP_NUM_THREADS", "2");
    if let Some(m) = model {
        command.env("E2E_MODEL", m);
    }
    let out = command.output().expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "tests/e2e_tmux.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASS") || stdout.contains("SKIP"), "{stdout}");
}
