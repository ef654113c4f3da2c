//! The local developer loop as the README runs it: `dev` on the user-management example, the sample events
//! appended, the tables as the events say — into SQLite by default, and into Postgres with `--database`.

mod common;
mod reactor_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::repo;

#[tokio::test]
async fn dev_mode_projects_the_example_into_sqlite() {
    let data = tempfile::tempdir().expect("dir");
    let url = format!(
        "sqlite://{}?mode=ro",
        data.path()
            .join("user-management_users-read-model.db")
            .display()
    );
    project_the_example(data.path(), None, &url).await;
}

#[tokio::test]
async fn dev_mode_projects_the_example_into_postgres() {
    let pg = Postgres::start().await.expect("postgres");
    let url = pg.fresh_database().await.expect("db");
    let data = tempfile::tempdir().expect("dir");
    project_the_example(data.path(), Some(&url), &url).await;
}

async fn project_the_example(data_dir: &Path, database: Option<&str>, read_url: &str) {
    let nats = NatsServer::start().await.expect("nats");
    let example = repo::user_management_example();
    let (dev, admin) = start_dev(
        &example,
        data_dir,
        database,
        &nats.url(),
        &[],
        Stdio::inherit(),
    )
    .await;
    append_events(&example, &example.join("events.ndjson"), &nats.url());
    let caught_up = wait_until(Duration::from_secs(30), || async {
        http_get(admin, "/readyz")
            .await
            .1
            .contains("checkpoint 14,")
    })
    .await;
    assert!(caught_up, "{:?}", http_get(admin, "/readyz").await);

    let users = query_strings(read_url, "SELECT id, email, name FROM users ORDER BY id").await;
    assert_eq!(
        users,
        vec![
            vec!["u-ada", "ada@example.com", "Ada Lovelace"],
            vec!["u-alan", "alan@example.com", "Alan M. Turing"],
            vec!["u-grace", "grace.hopper@example.com", "Grace Hopper"],
        ]
    );
    let roles = query_strings(
        read_url,
        "SELECT user_id, role FROM user_roles ORDER BY user_id, role",
    )
    .await;
    assert_eq!(
        roles,
        vec![
            vec!["u-ada", "admin"],
            vec!["u-alan", "auditor"],
            vec!["u-grace", "admin"],
            vec!["u-grace", "developer"],
        ]
    );
    assert!(
        query_strings(read_url, "SELECT * FROM projectionist_dead_letters")
            .await
            .is_empty()
    );

    interrupt(dev).await;
}

/// `dev` follows its files: an edited handler with a new rebuild token rebuilds the read model with the new SQL
/// without a restart; a file that no longer parses is reported and the running projection carries on.
#[tokio::test]
async fn dev_mode_follows_its_yaml_files() {
    let nats = NatsServer::start().await.expect("nats");
    let files = tempfile::tempdir().expect("dir");
    for entry in std::fs::read_dir(repo::user_management_example()).expect("example") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, files.path().join(path.file_name().expect("name"))).expect("copy");
    }
    let data = tempfile::tempdir().expect("dir");
    let read_url = format!(
        "sqlite://{}?mode=ro",
        data.path()
            .join("user-management_users-read-model.db")
            .display()
    );
    let log = tempfile::NamedTempFile::new().expect("log");
    let (dev, admin) = start_dev(
        files.path(),
        data.path(),
        None,
        &nats.url(),
        &["--reload-interval", "200ms"],
        log.reopen().expect("log").into(),
    )
    .await;
    append_events(
        files.path(),
        &files.path().join("events.ndjson"),
        &nats.url(),
    );
    let names =
        || async { query_strings(&read_url, "SELECT id, name FROM users ORDER BY id").await };
    let before = vec![
        vec!["u-ada", "Ada Lovelace"],
        vec!["u-alan", "Alan M. Turing"],
        vec!["u-grace", "Grace Hopper"],
    ];
    assert!(
        wait_until(Duration::from_secs(30), || async {
            names().await == before
        })
        .await,
        "{:?}",
        http_get(admin, "/readyz").await
    );

    // A broken edit: reported, the projection carries on.
    let projection = files.path().join("projection.yaml");
    let original = std::fs::read_to_string(&projection).expect("projection.yaml");
    std::fs::write(&projection, format!("{original}\n  handlers: [unclosed\n")).expect("write");
    let reported = wait_until(Duration::from_secs(10), || async {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .contains("keeping the running one")
    })
    .await;
    assert!(
        reported,
        "{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    // The handler changed, with a new rebuild token: the read model is rebuilt with the new SQL.
    let edited = original
        .replace(
            "VALUES (:data.userId, :data.email, :data.name,",
            "VALUES (:data.userId, :data.email, UPPER(:data.name),",
        )
        .replace("token: \"2026-11-01\"", "token: upper-case-names");
    assert_ne!(edited, original);
    std::fs::write(&projection, edited).expect("write");
    let after = vec![
        vec!["u-ada", "ADA LOVELACE"],
        vec!["u-alan", "Alan M. Turing"],
        vec!["u-grace", "GRACE HOPPER"],
    ];
    assert!(
        wait_until(Duration::from_secs(30), || async { names().await == after }).await,
        "{:?}\n{:?}\n{}",
        names().await,
        http_get(admin, "/readyz").await,
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    let token = query_strings(
        &read_url,
        "SELECT rebuild_token FROM projectionist_checkpoints",
    )
    .await;
    assert_eq!(token, vec![vec!["upper-case-names".to_string()]]);

    interrupt(dev).await;
}

#[tokio::test]
async fn dev_mode_runs_the_reactors_of_its_yaml() {
    let nats = NatsServer::start().await.expect("nats");
    let endpoint = reactor_support::Endpoint::start(|_| reactor_support::Reply::ok()).await;
    let files = tempfile::tempdir().expect("dir");
    let example = repo::user_management_example();
    for file in ["eventstore.yaml", "events.ndjson"] {
        std::fs::copy(example.join(file), files.path().join(file)).expect("copy");
    }
    let reactor = std::fs::read_to_string(example.join("../reactors/welcome-email.yaml"))
        .expect("reactor example")
        .replace("http://127.0.0.1:8080/events", &endpoint.url())
        .replace("policy: New ", "policy: All ");
    std::fs::write(files.path().join("reactor.yaml"), reactor).expect("write");
    // The events are in the store before the reactor starts: its first pull brings all of them at once, other
    // types among them (which it acknowledges without a call).
    let provisioned = Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .args(["provision", "-f"])
        .arg(files.path())
        .env("PROJECTIONIST_NATS_URL", nats.url())
        .output()
        .expect("provision");
    assert!(provisioned.status.success(), "{provisioned:?}");
    append_events(
        files.path(),
        &files.path().join("events.ndjson"),
        &nats.url(),
    );
    let data = tempfile::tempdir().expect("dir");
    let (dev, admin) = start_dev(
        files.path(),
        data.path(),
        None,
        &nats.url(),
        &[],
        Stdio::inherit(),
    )
    .await;
    let (_, ready) = http_get(admin, "/readyz").await;
    assert!(
        ready.contains("reactor user-management/welcome-email: ready"),
        "{ready}"
    );
    let created = ["u-ada", "u-alan", "u-grace"];
    let delivered = wait_until(Duration::from_secs(30), || async {
        let calls = endpoint.shared.calls.lock().expect("lock").clone();
        created
            .iter()
            .all(|u| calls.iter().any(|c| c.aggregate == format!("user.{u}")))
    })
    .await;
    let calls = endpoint.shared.calls.lock().expect("lock").clone();
    interrupt(dev).await;
    assert!(delivered, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.headers.get("ce-type").map(String::as_str) == Some("UserCreated")),
        "only the reactor's types are delivered"
    );
}

/// `dev -f files` on a fresh admin port, until it is ready; the process and its admin address.
async fn start_dev(
    files: &Path,
    data_dir: &Path,
    database: Option<&str>,
    nats_url: &str,
    extra: &[&str],
    stderr: Stdio,
) -> (std::process::Child, std::net::SocketAddr) {
    let admin_port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"));
    if let Some(db) = database {
        command.env("PROJECTIONIST_DATABASE_URL", db);
    }
    let dev = command
        .arg("dev")
        .arg("-f")
        .arg(files)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin_port}"))
        .args(extra)
        .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
        .env("PROJECTIONIST_NATS_URL", nats_url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("dev");
    let admin = ([127, 0, 0, 1], admin_port).into();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            http_get(admin, "/readyz").await.0 == 200
        })
        .await
    );
    (dev, admin)
}

/// `append -f files --events events`.
fn append_events(files: &Path, events: &Path, nats_url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .arg("append")
        .arg("-f")
        .arg(files)
        .arg("--events")
        .arg(events)
        .env("PROJECTIONIST_NATS_URL", nats_url)
        .output()
        .expect("append");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGINT, then a clean exit.
async fn interrupt(dev: std::process::Child) {
    let mut dev = dev;
    kill(Pid::from_raw(dev.id() as i32), Signal::SIGINT).expect("interrupt");
    let status = tokio::task::spawn_blocking(move || dev.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}
