//! The operator binary as a user runs it.

use std::process::Command;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_projectionist-operator"))
}

#[test]
fn help_lists_the_commands() {
    let out = operator().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("crds") && text.contains("plan"), "{text}");
}

#[test]
fn crds_command_prints_both_crds() {
    let out = operator().arg("crds").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name: eventstores.projectionist.dev"));
    assert!(text.contains("name: projections.projectionist.dev"));
}

#[test]
fn plan_shows_stream_consumer_and_needed_secrets() {
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/user-management");
    let out = operator()
        .arg("plan")
        .arg("-f")
        .arg(examples)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stream user-management_users"), "{text}");
    assert!(
        text.contains("durable consumer user-management_users-read-model"),
        "{text}"
    );
    assert!(
        text.contains("needs Secret users-db/url as env PROJECTIONIST_SECRET_USERS_DB_URL_"),
        "{text}"
    );
}

#[test]
fn plan_refuses_a_projection_without_its_store() {
    let dir = tempfile::tempdir().expect("dir");
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/user-management");
    std::fs::copy(examples.join("projection.yaml"), dir.path().join("p.yaml")).expect("copy");
    let out = operator()
        .arg("plan")
        .arg("-f")
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("EventStore \"users\" not found"));
}
