//! The test bed itself: each real server starts on a free loopback port, hands out fresh databases, survives a stop
//! and start on the same port and data, and is gone after the handle drops.

use std::time::Duration;

use projectionist_tests::mariadb::MariaDb;
use projectionist_tests::nats::NatsServer;
use projectionist_tests::postgres::Postgres;
use projectionist_tests::process::{free_port, wait_for_port};
use projectionist_tests::sqlite::Sqlite;
use sqlx::{Connection, Row};

#[tokio::test]
async fn nats_keeps_its_port_and_store_across_an_outage() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = server.jetstream().await.expect("jetstream");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OUTAGE".into(),
        subjects: vec!["outage.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    js.publish("outage.a", "1".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    server.stop();
    assert!(
        !wait_for_port(server.port(), Duration::from_millis(300)),
        "stopped server still listens"
    );
    server.start_again().await.expect("restart");
    assert_eq!(server.url(), url);
    let js = server.jetstream().await.expect("jetstream");
    let mut stream = js.get_stream("OUTAGE").await.expect("stream survived");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);

    server.kill();
    server.start_again().await.expect("restart after a crash");
    let js = server.jetstream().await.expect("jetstream");
    let mut stream = js
        .get_stream("OUTAGE")
        .await
        .expect("stream survived a crash");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);

    let port = server.port();
    drop(server);
    assert!(
        !wait_for_port(port, Duration::from_millis(300)),
        "dropped server still listens"
    );
}

#[test]
fn free_ports_are_never_handed_out_twice() {
    let ports: Vec<u16> = (0..500).map(|_| free_port().expect("port")).collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
}

#[tokio::test]
async fn a_server_whose_port_is_taken_moves_instead_of_mistaking_the_other_server_for_itself() {
    let first = NatsServer::start().await.expect("first nats-server");
    let second = NatsServer::start_preferring(first.port())
        .await
        .expect("second nats-server");
    assert_ne!(second.port(), first.port(), "moved to another port");
    let js = second.jetstream().await.expect("jetstream");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "MINE".into(),
        subjects: vec!["mine.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    drop(js);
    let other = first.jetstream().await.expect("jetstream of the first");
    assert!(
        other.get_stream("MINE").await.is_err(),
        "the second server's stream went to the first"
    );
}

#[tokio::test]
async fn postgres_hands_out_fresh_databases_and_survives_a_restart() {
    let mut pg = Postgres::start().await.expect("postgres");
    let a = pg.fresh_database().await.expect("db a");
    let b = pg.fresh_database().await.expect("db b");
    assert_ne!(a, b);
    let mut conn = sqlx::PgConnection::connect(&a).await.expect("connect a");
    sqlx::query("CREATE TABLE t (v INT)")
        .execute(&mut conn)
        .await
        .expect("create");
    sqlx::query("INSERT INTO t VALUES (42)")
        .execute(&mut conn)
        .await
        .expect("insert");
    conn.close().await.expect("close");
    let mut other = sqlx::PgConnection::connect(&b).await.expect("connect b");
    assert!(
        sqlx::query("SELECT v FROM t")
            .fetch_one(&mut other)
            .await
            .is_err(),
        "databases are separate"
    );
    other.close().await.expect("close");

    pg.stop();
    assert!(
        sqlx::PgConnection::connect(&a).await.is_err(),
        "stopped server refuses connections"
    );
    pg.start_again().await.expect("restart");
    let mut conn = sqlx::PgConnection::connect(&a).await.expect("reconnect");
    let v: i32 = sqlx::query("SELECT v FROM t")
        .fetch_one(&mut conn)
        .await
        .expect("select")
        .get(0);
    assert_eq!(v, 42);
    conn.close().await.expect("close");

    let port = pg.port();
    drop(pg);
    assert!(
        !wait_for_port(port, Duration::from_millis(300)),
        "dropped server still listens"
    );
}

#[tokio::test]
async fn mariadb_hands_out_fresh_databases_and_survives_a_restart() {
    let mut db = MariaDb::start().await.expect("mariadb");
    let a = db.fresh_database().await.expect("db a");
    let b = db.fresh_database().await.expect("db b");
    assert_ne!(a, b);
    let mut conn = sqlx::MySqlConnection::connect(&a).await.expect("connect a");
    sqlx::query("CREATE TABLE t (v INT) ENGINE=InnoDB")
        .execute(&mut conn)
        .await
        .expect("create");
    sqlx::query("INSERT INTO t VALUES (7)")
        .execute(&mut conn)
        .await
        .expect("insert");
    conn.close().await.expect("close");

    db.kill();
    db.start_again().await.expect("restart after a crash");
    let mut conn = sqlx::MySqlConnection::connect(&a).await.expect("reconnect");
    let v: i32 = sqlx::query("SELECT v FROM t")
        .fetch_one(&mut conn)
        .await
        .expect("select")
        .get(0);
    assert_eq!(v, 7);
    conn.close().await.expect("close");
    let mut other = sqlx::MySqlConnection::connect(&b).await.expect("connect b");
    assert!(
        sqlx::query("SELECT v FROM t")
            .fetch_one(&mut other)
            .await
            .is_err(),
        "databases are separate"
    );
    other.close().await.expect("close");
}

#[tokio::test]
async fn sqlite_files_are_separate_and_persistent() {
    let dir = Sqlite::new().expect("dir");
    let a = dir.fresh_database();
    let b = dir.fresh_database();
    assert_ne!(a, b);
    let mut conn = sqlx::SqliteConnection::connect(&a)
        .await
        .expect("connect a");
    sqlx::query("CREATE TABLE t (v INTEGER)")
        .execute(&mut conn)
        .await
        .expect("create");
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut conn)
        .await
        .expect("insert");
    conn.close().await.expect("close");
    let mut conn = sqlx::SqliteConnection::connect(&a).await.expect("reopen a");
    let v: i64 = sqlx::query("SELECT v FROM t")
        .fetch_one(&mut conn)
        .await
        .expect("select")
        .get(0);
    assert_eq!(v, 1);
    let mut other = sqlx::SqliteConnection::connect(&b)
        .await
        .expect("connect b");
    assert!(
        sqlx::query("SELECT v FROM t")
            .fetch_one(&mut other)
            .await
            .is_err()
    );
}
