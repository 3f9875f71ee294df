//! The tmux end-to-end run (tests/e2e_tmux.sh) as part of the suite: the wizard
//! driven by keystrokes, a detached trainer, a killed tmux server (the dropped SSH
//! connection), attach, resize and SIGTERM. The script skips itself, with a
//! message, where tmux is not installed.

use std::process::Command;

#[test]
fn wizard_detach_dropped_terminal_attach_in_tmux() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e_tmux.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_dreambooth"))
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "tests/e2e_tmux.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASS") || stdout.contains("SKIP"), "{stdout}");
}
