//! The local developer loop as the README runs it: `dev` on the user-management example, the sample events
//! appended, the tables as the events say — into SQLite by default, and into Postgres with `--database`.

mod common;

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
    let admin_port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"));
    if let Some(db) = database {
        command.env("PROJECTIONIST_DATABASE_URL", db);
    }
    let mut dev = command
        .arg("dev")
        .arg("-f")
        .arg(&example)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin_port}"))
        .env("PROJECTIONIST_API_ADDR", "127.0.0.1:0")
        .env("PROJECTIONIST_NATS_URL", nats.url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dev");
    let admin = ([127, 0, 0, 1], admin_port).into();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            http_get(admin, "/readyz").await.0 == 200
        })
        .await
    );

    let out = Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .arg("append")
        .arg("-f")
        .arg(&example)
        .arg("--events")
        .arg(example.join("events.ndjson"))
        .env("PROJECTIONIST_NATS_URL", nats.url())
        .output()
        .expect("append");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    kill(Pid::from_raw(dev.id() as i32), Signal::SIGINT).expect("interrupt");
    let status = tokio::task::spawn_blocking(move || dev.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}
