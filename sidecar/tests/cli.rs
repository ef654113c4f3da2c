//! The sidecar binary as a user runs it.

use std::process::Command;

fn sidecar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/user-management")
}

#[test]
fn help_lists_the_commands() {
    let out = sidecar().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["check", "resolve", "Usage"] {
        assert!(text.contains(word), "{text}");
    }
}

#[test]
fn resolved_examples_pass_the_check() {
    let out = sidecar()
        .arg("resolve")
        .arg("-f")
        .arg(examples())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("users.yaml"), &out.stdout).expect("write");
    let out = sidecar()
        .arg("check")
        .arg("--config-dir")
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("user-management/users-read-model"));
}

#[test]
fn a_malformed_config_names_the_file_and_field_and_exits_non_zero() {
    let out = sidecar()
        .arg("resolve")
        .arg("-f")
        .arg(examples())
        .output()
        .expect("runs");
    let yaml = String::from_utf8_lossy(&out.stdout).replace("maxEvents: 500", "maxEvents: lots");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("users.yaml");
    std::fs::write(&file, yaml).expect("write");
    let out = sidecar()
        .env("PROJECTIONIST_CONFIG_DIR", dir.path())
        .arg("check")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("batch.maxEvents"),
        "{err}"
    );
}
