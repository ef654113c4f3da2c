//! The event-store API against a real nats-server, through a real HTTP client: optimistic concurrency under a race,
//! atomic batches (also across a nats-server kill), de-duplicated retries, reading, read-your-writes waits, and the
//! OpenAPI document.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{InProcess, config_of, ledger, provision};
use projectionist_crds::projection::{Driver, ErrorPolicy};
use projectionist_sidecar::runtime::{Launch, Workload};
use projectionist_tests::http::{Response, request, request_text};
use projectionist_tests::nats::NatsServer;
use projectionist_tests::sqlite::Sqlite;
use serde_json::{Value, json};

const EVENTS: &str = "/v1/stores/bank/aggregates";

async fn call(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Response {
    request(api, method, path, body.as_ref(), Duration::from_secs(30))
        .await
        .expect("answered")
}

fn tick(id: &str, account: &str, n: i64) -> Value {
    json!({"id": id, "type": "Tick", "source": "/tests", "data": {"account": account, "n": n}})
}

fn assert_problem(r: &Response, status: u16) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type(), "application/problem+json");
    let body = r.json();
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
}

/// A sidecar serving the `bank` store and running the `ledger` projection into SQLite.
struct Fixture {
    nats: NatsServer,
    sidecar: InProcess,
    _db: Sqlite,
    db_url: String,
}

async fn start(policy: ErrorPolicy, max_wait: &str) -> Fixture {
    let nats = NatsServer::start().await.expect("nats");
    let (store, mut projection) = ledger(&nats.url(), Driver::Sqlite, policy, "5s");
    projection.spec.batch.max_wait = max_wait.into();
    projection.spec.events = Some(projectionist_crds::projection::EventSelection {
        subjects: vec!["test.bank.account.>".into()],
    });
    provision(&nats.jetstream().await.expect("js"), &store, &projection).await;
    let db = Sqlite::new().expect("sqlite");
    let db_url = db.fresh_database();
    let sidecar = InProcess::run(Workload {
        projections: vec![Launch {
            config: config_of(&store, &projection),
            watch: None,
            database_url: Some(db_url.clone()),
            nats_url: Some(nats.url()),
        }],
        stores: Vec::new(),
        ..Default::default()
    })
    .await;
    Fixture {
        nats,
        sidecar,
        _db: db,
        db_url,
    }
}

async fn read(api: SocketAddr, aggregate: &str, query: &str) -> Value {
    let r = call(
        api,
        "GET",
        &format!("{EVENTS}/{aggregate}/events{query}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_each_version_is_won_once_and_losers_see_the_current_version() {
    let f = start(ErrorPolicy::Halt, "20ms").await;
    let api = f.sidecar.api;
    let writers = 20;
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _attempt in 0..200 {
                let version = read(api, "account/hot", "").await["version"]
                    .as_u64()
                    .expect("version");
                let r = call(
                    api,
                    "POST",
                    &format!("{EVENTS}/account/hot/events"),
                    Some(json!({"expectedVersion": version, "events": [tick(&format!("w{w}"), "hot", w)]})),
                )
                .await;
                match r.status {
                    200 => {
                        let body = r.json();
                        assert_eq!(body["duplicate"], false);
                        return (w, version, body["version"].as_u64().expect("v"), conflicts);
                    }
                    409 => {
                        assert_problem(&r, 409);
                        let current = r.json()["currentVersion"].as_u64().expect("current");
                        assert!(current > version, "{current} > {version}");
                        conflicts += 1;
                    }
                    other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
                }
            }
            panic!("writer {w} never won");
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.push(t.await.expect("writer"));
    }
    let conflicts: usize = won.iter().map(|w| w.3).sum();
    assert!(
        conflicts > 0,
        "20 racing writers must conflict at least once"
    );

    // The aggregate's events: every writer exactly once, each appended on the version before it.
    let all = read(api, "account/hot", "").await;
    let events = all["events"].as_array().expect("events");
    assert_eq!(events.len(), writers as usize);
    let ids: BTreeSet<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), writers as usize, "no duplicates, no lost writes");
    let mut previous = 0;
    for e in events {
        let seq = e["sequence"].as_u64().expect("seq");
        let writer = won
            .iter()
            .find(|w| format!("w{}", w.0) == e["id"].as_str().unwrap_or_default())
            .expect("a writer");
        assert_eq!(writer.1, previous, "appended on the version before it");
        assert_eq!(writer.2, seq);
        previous = seq;
    }
    assert_eq!(all["version"].as_u64(), Some(previous));

    let metrics = f.sidecar.get("/metrics").await.1;
    assert!(
        common::metric(
            &metrics,
            "projectionist_sidecar_api_conflicts_total{store=\"bank\"}"
        )
        .is_some_and(|c| c >= 1.0),
        "{metrics}"
    );
    assert!(metrics.contains("projectionist_sidecar_api_requests_total{method=\"POST\",route=\"/v1/stores/{store}/aggregates/{type}/{id}/events\",status=\"409\"}"), "{metrics}");
    assert!(metrics.contains("projectionist_sidecar_api_append_duration_seconds_bucket"));
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_appended_whole_or_not_at_all_and_a_retry_is_answered_with_the_originals() {
    let f = start(ErrorPolicy::Halt, "20ms").await;
    let api = f.sidecar.api;
    let path = format!("{EVENTS}/account/b1/events");

    // One invalid event: nothing appended.
    let bad = json!({"expectedVersion": 0, "events": [tick("b1-1", "b1", 1), {"id": "b1-2", "data": {}}, tick("b1-3", "b1", 3)]});
    assert_problem(&call(api, "POST", &path, Some(bad)).await, 400);
    assert_eq!(read(api, "account/b1", "").await["version"], 0);

    let batch = json!({"expectedVersion": 0, "events": [tick("b1-1", "b1", 1), tick("b1-2", "b1", 2), tick("b1-3", "b1", 3)]});
    let first = call(api, "POST", &path, Some(batch.clone())).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let first = first.json();
    let sequences: Vec<u64> = first["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(sequences.len(), 3);
    assert!(sequences.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(first["version"].as_u64(), sequences.last().copied());

    // The same request again: the originals, marked duplicate, nothing appended.
    let again = call(api, "POST", &path, Some(batch)).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(again.json()["sequences"], first["sequences"]);
    assert_eq!(
        read(api, "account/b1", "").await["events"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // A single event retried.
    let one = json!({"events": [tick("s-1", "b1", 4)]});
    let a = call(api, "POST", &path, Some(one.clone())).await.json();
    let b = call(api, "POST", &path, Some(one)).await.json();
    assert_eq!(b["duplicate"], true);
    assert_eq!(a["sequences"], b["sequences"]);

    // An id reused for another aggregate, or a retry that differs from the original: 409, nothing appended.
    let reused = json!({"events": [tick("s-1", "b2", 1)]});
    assert_problem(
        &call(
            api,
            "POST",
            &format!("{EVENTS}/account/b2/events"),
            Some(reused),
        )
        .await,
        409,
    );
    let partial = json!({"events": [tick("b1-1", "b1", 1), tick("new-1", "b1", 9)]});
    assert_problem(&call(api, "POST", &path, Some(partial)).await, 409);
    assert_eq!(
        read(api, "account/b1", "").await["events"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    assert_eq!(read(api, "account/b2", "").await["version"], 0);

    // Bad input: problem bodies with the right status.
    let too_big = json!({"events": [{"id": "big", "type": "Tick", "data": {"blob": "x".repeat(2 * 1024 * 1024)}}]});
    assert_problem(&call(api, "POST", &path, Some(too_big)).await, 413);
    assert_problem(
        &call(
            api,
            "POST",
            &format!("{EVENTS}/account/a.b/events"),
            Some(json!({"events": [tick("x", "x", 1)]})),
        )
        .await,
        400,
    );
    assert_problem(
        &call(
            api,
            "POST",
            "/v1/stores/nope/aggregates/account/1/events",
            Some(json!({"events": [tick("x", "x", 1)]})),
        )
        .await,
        404,
    );
    assert_problem(
        &call(api, "POST", &path, Some(json!({"events": []}))).await,
        400,
    );
    assert_problem(&call(api, "DELETE", &path, None).await, 405);
    assert_problem(&call(api, "GET", "/v1/elsewhere", None).await, 404);
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_killed_while_batches_commit_leaves_every_batch_whole_and_retries_never_double() {
    let mut f = start(ErrorPolicy::Halt, "20ms").await;
    let api = f.sidecar.api;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && k < 2000 {
                let id = format!("k{k}");
                let events: Vec<Value> =
                    (0..5).map(|i| tick(&format!("{id}-{i}"), &id, i)).collect();
                let body = json!({"expectedVersion": 0, "events": events});
                // Retry the same request on 503 (what a client does); every batch ends appended once or never.
                for _ in 0..100 {
                    let r = request(
                        api,
                        "POST",
                        &format!("{EVENTS}/account/{id}/events"),
                        Some(&body),
                        Duration::from_secs(20),
                    )
                    .await;
                    match r {
                        Ok(r) if r.status == 200 => {
                            confirmed.push(id.clone());
                            break;
                        }
                        Ok(r) if r.status == 503 => {
                            assert!(r.headers.contains_key("retry-after"));
                        }
                        Ok(r) => panic!(
                            "unexpected {}: {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        ),
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                k += 1;
            }
            (k, confirmed)
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        f.nats.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        f.nats.start_again().await.expect("nats again");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (attempted, confirmed) = writer.await.expect("writer");
    assert!(confirmed.len() > 10, "{} of {attempted}", confirmed.len());
    for k in 0..attempted {
        let id = format!("k{k}");
        let got = read(api, &format!("account/{id}"), "").await;
        let n = got["events"].as_array().map(Vec::len).unwrap_or_default();
        assert!(
            n == 0 || n == 5,
            "batch {id} is whole or absent, found {n} events"
        );
        if confirmed.contains(&id) {
            assert_eq!(n, 5, "a confirmed batch {id} is there");
        }
    }
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_reads_back_in_order_with_paging_and_an_unknown_one_is_version_zero() {
    let f = start(ErrorPolicy::Halt, "20ms").await;
    let api = f.sidecar.api;
    let path = format!("{EVENTS}/account/r1/events");
    let mut expected = 0;
    for chunk in 0..3 {
        let events: Vec<Value> = (0..4)
            .map(|i| tick(&format!("r1-{chunk}-{i}"), "r1", i))
            .collect();
        let r = call(
            api,
            "POST",
            &path,
            Some(json!({"expectedVersion": expected, "events": events})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        expected = r.json()["version"].as_u64().expect("version");
        // Another aggregate in between, so versions are not counts.
        call(
            api,
            "POST",
            &format!("{EVENTS}/account/other/events"),
            Some(json!({"events": [tick(&format!("o-{chunk}"), "o", 1)]})),
        )
        .await;
    }
    let all = read(api, "account/r1", "").await;
    assert_eq!(all["version"].as_u64(), Some(expected));
    let events = all["events"].as_array().expect("events");
    assert_eq!(events.len(), 12);
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(events[0]["id"], "r1-0-0");
    assert_eq!(events[0]["type"], "Tick");
    assert_eq!(events[0]["subject"], "account.r1");
    assert_eq!(events[0]["data"]["account"], "r1");

    let page = read(api, "account/r1", &format!("?after={}&limit=4", seqs[3])).await;
    let page_seqs: Vec<u64> = page["events"]
        .as_array()
        .expect("page")
        .iter()
        .filter_map(|e| e["sequence"].as_u64())
        .collect();
    assert_eq!(page_seqs, seqs[4..8].to_vec());
    let tail = read(api, "account/r1", &format!("?after={}", seqs[11])).await;
    assert_eq!(tail["events"].as_array().map(Vec::len), Some(0));
    assert_eq!(tail["version"].as_u64(), Some(expected));

    let unknown = read(api, "account/nobody", "").await;
    assert_eq!(unknown, json!({"version": 0, "events": []}));

    // Data reads back as it was sent: member order and number precision kept, whitespace between tokens dropped.
    let sent = r#"{"events": [{"id": "exact-1", "type": "Exact",
        "data": {"z": 1, "a": [1.50, 12345678901234567890123], "s": "x  y"}}]}"#;
    let exact = format!("{EVENTS}/account/exact/events");
    let r = request_text(api, "POST", &exact, sent, Duration::from_secs(30))
        .await
        .expect("answered");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let back = call(api, "GET", &exact, None).await;
    let text = String::from_utf8_lossy(&back.body);
    assert!(
        text.contains(r#""data":{"z":1,"a":[1.50,12345678901234567890123],"s":"x  y"}"#),
        "{text}"
    );
    for query in ["?limit=0", "?after=-1", "?limit=x"] {
        assert_problem(
            &call(api, "GET", &format!("{path}{query}"), None).await,
            400,
        );
    }
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_answers_once_applied_at_once_when_nothing_is_due_and_times_out_or_refuses_a_halt()
{
    // A long batch wait: an appended event is applied only when the batch closes, seconds later.
    let f = start(ErrorPolicy::Halt, "3s").await;
    let api = f.sidecar.api;
    let ok = call(
        api,
        "POST",
        &format!("{EVENTS}/account/w1/events"),
        Some(json!({"events": [tick("w1-1", "w1", 7)]})),
    )
    .await;
    let version = ok.json()["version"].as_u64().expect("version");

    let early = call(
        api,
        "GET",
        &format!("/v1/projections/ledger/wait?sequence={version}&timeout=100ms"),
        None,
    )
    .await;
    assert_problem(&early, 504);
    assert!(
        early.json()["checkpoint"]
            .as_u64()
            .is_some_and(|c| c < version)
    );

    let waited = call(
        api,
        "GET",
        &format!("/v1/projections/ledger/wait?sequence={version}&timeout=20s"),
        None,
    )
    .await;
    assert_eq!(
        waited.status,
        200,
        "{}",
        String::from_utf8_lossy(&waited.body)
    );
    assert!(
        waited.json()["checkpoint"]
            .as_u64()
            .is_some_and(|c| c >= version)
    );
    // Read-your-writes: the read model has the event as soon as the wait answered.
    assert_eq!(
        common::read_ledger(&f.db_url).await.get("w1").map(|v| v.1),
        Some(1)
    );

    // An applied sequence, and one on a subject the projection does not read: at once.
    let again = call(
        api,
        "GET",
        &format!("/v1/projections/ledger/wait?sequence={version}&timeout=100ms"),
        None,
    )
    .await;
    assert_eq!(again.status, 200);
    let outside = call(
        api,
        "POST",
        "/v1/stores/bank/aggregates/audit/x/events",
        Some(json!({"events": [{"id": "audit-1", "type": "Audited"}]})),
    )
    .await;
    let outside = outside.json()["version"].as_u64().expect("version");
    let at_once = call(
        api,
        "GET",
        &format!("/v1/projections/ledger/wait?sequence={outside}&timeout=100ms"),
        None,
    )
    .await;
    assert_eq!(
        at_once.status,
        200,
        "{}",
        String::from_utf8_lossy(&at_once.body)
    );

    assert_problem(
        &call(api, "GET", "/v1/projections/nope/wait?sequence=1", None).await,
        404,
    );
    assert_problem(
        &call(api, "GET", "/v1/projections/ledger/wait", None).await,
        400,
    );
    assert_problem(
        &call(
            api,
            "GET",
            "/v1/projections/ledger/wait?sequence=1&timeout=soon",
            None,
        )
        .await,
        400,
    );
    assert_problem(
        &call(
            api,
            "GET",
            "/v1/projections/ledger/wait?sequence=1&timeout=10m",
            None,
        )
        .await,
        400,
    );
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_on_a_halted_projection_is_refused_with_its_reason() {
    let f = start(ErrorPolicy::Halt, "20ms").await;
    let api = f.sidecar.api;
    // A note whose body violates the table's CHECK constraint halts the projection.
    let poison = json!({"events": [{"id": "n-1", "type": "Noted", "data": {"id": "n-1", "body": "forbidden"}}]});
    call(
        api,
        "POST",
        &format!("{EVENTS}/account/n1/events"),
        Some(poison),
    )
    .await;
    let later = call(
        api,
        "POST",
        &format!("{EVENTS}/account/n1/events"),
        Some(json!({"events": [tick("n1-2", "n1", 1)]})),
    )
    .await;
    let version = later.json()["version"].as_u64().expect("version");
    let r = call(
        api,
        "GET",
        &format!("/v1/projections/ledger/wait?sequence={version}&timeout=20s"),
        None,
    )
    .await;
    assert_problem(&r, 409);
    assert!(
        r.json()["reason"].as_str().is_some_and(|s| !s.is_empty()),
        "{}",
        r.json()
    );
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_as_kept_in_the_repository_and_names_every_route() {
    let f = start(ErrorPolicy::Halt, "20ms").await;
    let api = f.sidecar.api;
    let served = call(api, "GET", "/v1/openapi.json", None).await;
    assert_eq!(served.status, 200);
    let kept =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/openapi.json")).expect("kept");
    assert_eq!(served.body.as_ref(), kept.as_slice());
    let doc = served.json();
    assert_eq!(doc["openapi"], "3.0.3");
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for method in methods
            .as_object()
            .expect("methods")
            .keys()
            .filter(|m| *m != "parameters")
        {
            let concrete = path
                .replace("{store}", "bank")
                .replace("{type}", "account")
                .replace("{id}", "doc")
                .replace("{name}", "ledger");
            let r = call(
                api,
                &method.to_uppercase(),
                &format!("{concrete}?sequence=0"),
                None,
            )
            .await;
            // This sidecar runs no reactor: its routes answer a 404 that says so, not the router's.
            let routed = r.status != 405
                && (r.status != 404
                    || String::from_utf8_lossy(&r.body).contains("runs no reactor"));
            assert!(routed, "{method} {path} is routed: {}", r.status);
        }
    }
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_based_requests_from_the_openapi_document_find_no_server_error_and_every_4xx_is_a_problem()
 {
    let f = start(ErrorPolicy::Skip, "20ms").await;
    let api = f.sidecar.api;
    let schemathesis = projectionist_tests::tools::schemathesis().expect("schemathesis");
    let reports = tempfile::tempdir().expect("tempdir");
    let mut run = tokio::process::Command::new(schemathesis);
    run.arg("run")
        .arg(format!("http://{api}/v1/openapi.json"))
        .args(["--url", &format!("http://{api}")])
        // Responses are checked against the document: status codes it declares, problem bodies for every 4xx.
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "25", "--seed", "20261201", "--max-time", "100"])
        .args(["--request-timeout", "30", "--workers", "1"])
        .arg("--report-dir")
        .arg(reports.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(reports.path())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), run.output())
        .await
        .expect("schemathesis finished in time")
        .expect("schemathesis ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_run_with_only_a_store_config_serves_the_api_for_that_store() {
    let nats = NatsServer::start().await.expect("nats");
    let (store, projection) = ledger(&nats.url(), Driver::Sqlite, ErrorPolicy::Halt, "5s");
    provision(&nats.jetstream().await.expect("js"), &store, &projection).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = projectionist_crds::store_config::resolve_store(&store).config;
    std::fs::write(
        dir.path().join("bank.store.yaml"),
        config.to_yaml().expect("yaml"),
    )
    .expect("write");

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
        .args(["check", "--config-dir"])
        .arg(dir.path())
        .output()
        .expect("check");
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("event store test/bank"));

    let port = common::free_port();
    let _sidecar = common::SidecarProcess::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_projectionist-sidecar"))
            .args([
                "run",
                "--admin-addr",
                "127.0.0.1:0",
                "--api-addr",
                &format!("127.0.0.1:{port}"),
                "--config-dir",
            ])
            .arg(dir.path()),
    );
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let body = json!({"expectedVersion": 0, "events": [tick("only-1", "only", 1)]});
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(r) = request(
            api,
            "POST",
            &format!("{EVENTS}/account/only/events"),
            Some(&body),
            Duration::from_secs(5),
        )
        .await
        {
            answer = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = answer.expect("the API answers");
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        read(api, "account/only", "").await["events"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}
