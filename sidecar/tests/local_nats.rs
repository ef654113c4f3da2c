//! The local tooling against a real nats-server: provision, append with de-duplication, status.

use std::process::{Command, Output};

use projectionist_tests::nats::NatsServer;
use projectionist_tests::repo;

fn sidecar(server: &NatsServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .env("PROJECTIONIST_NATS_URL", server.url())
        .args(args)
        .output()
        .expect("runs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn provision_append_and_status_work_on_the_example() {
    let server = NatsServer::start().await.expect("nats-server");
    let example = repo::user_management_example();
    let dir = example.to_str().expect("utf-8 path");
    let events = example.join("events.ndjson");
    let events = events.to_str().expect("utf-8 path");

    let out = ok(sidecar(&server, &["provision", "-f", dir]));
    assert!(
        out.contains("stream user-management_users: created"),
        "{out}"
    );
    assert!(
        out.contains("consumer user-management_users-read-model: created"),
        "{out}"
    );

    let out = ok(sidecar(&server, &["append", "-f", dir, "--events", events]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 14, "{out}");
    assert!(
        lines[0].trim_start().starts_with("1 ") && lines[13].trim_start().starts_with("14 "),
        "{out}"
    );
    assert!(!out.contains("duplicate"));

    let again = ok(sidecar(&server, &["append", "-f", dir, "--events", events]));
    assert_eq!(again.matches("duplicate").count(), 14, "{again}");

    let js = server.jetstream().await.expect("jetstream");
    let mut stream = js
        .get_stream("user-management_users")
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 14);
    let msg = stream.get_raw_message(1).await.expect("first event");
    let headers = msg.headers;
    assert_eq!(
        headers.get("ce-type").map(|v| v.as_str()),
        Some("UserCreated")
    );
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("evt-0001")
    );
    let body: serde_json::Value = serde_json::from_slice(&msg.payload).expect("json body");
    assert_eq!(body["email"], "ada@example.com");

    let out = ok(sidecar(&server, &["provision", "-f", dir]));
    assert!(out.contains("in sync") && !out.contains("created"), "{out}");
    let out = ok(sidecar(&server, &["status", "-f", dir]));
    assert!(out.contains("14 events"), "{out}");
    assert!(out.contains("lag 14"), "{out}");
}

#[tokio::test]
async fn a_bad_event_line_appends_nothing_and_names_the_line() {
    let server = NatsServer::start().await.expect("nats-server");
    let example = repo::user_management_example();
    let dir = example.to_str().expect("utf-8 path");
    ok(sidecar(&server, &["provision", "-f", dir]));
    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(
        file.path(),
        "{\"id\":\"a\",\"type\":\"UserCreated\",\"subject\":\"user.u-1\",\"data\":{}}\nnot json\n",
    )
    .expect("write");
    let out = sidecar(
        &server,
        &[
            "append",
            "-f",
            dir,
            "--events",
            file.path().to_str().expect("path"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let js = server.jetstream().await.expect("jetstream");
    let mut stream = js
        .get_stream("user-management_users")
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 0);
}

#[tokio::test]
async fn an_immutable_change_is_refused_before_it_reaches_the_server() {
    let server = NatsServer::start().await.expect("nats-server");
    let example = repo::user_management_example();
    ok(sidecar(
        &server,
        &["provision", "-f", example.to_str().expect("path")],
    ));

    let dir = tempfile::tempdir().expect("dir");
    let store = std::fs::read_to_string(example.join("eventstore.yaml")).expect("read");
    let changed = store.replace(
        "  deletionPolicy: Retain",
        "    storage: Memory\n    guardrails:\n      allowMemoryStorage: true\n  deletionPolicy: Retain",
    );
    assert_ne!(store, changed);
    std::fs::write(dir.path().join("eventstore.yaml"), changed).expect("write");
    let out = sidecar(
        &server,
        &["provision", "-f", dir.path().to_str().expect("path")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage: File → Memory (immutable)"), "{err}");
}
