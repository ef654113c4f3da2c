//! Shared parts of the reactor tests: a real HTTP endpoint written for the tests, which records every call and checks
//! as calls arrive that an aggregate never has two calls at once and never gets an event before the earlier ones of
//! its aggregate were answered 2xx; a reactor fixture on the ledger store; appending events.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use projectionist_crds::{EventStore, Reactor};
use tokio::task::JoinHandle;

/// One call as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub aggregate: String,
    pub id: String,
    pub sequence: u64,
    pub attempt: u32,
    pub status: u16,
    pub started: Instant,
    pub ended: Instant,
    pub body: Bytes,
    pub headers: BTreeMap<String, String>,
}

/// What the endpoint answers.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    pub emit: Option<String>,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            status: 204,
            ..Default::default()
        }
    }
    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Default::default()
        }
    }
}

/// Answers `422` to an event whose data has `"poison": true`, `204` to the others.
pub fn refuse_poison(call: &Call) -> Reply {
    let poison = serde_json::from_slice::<serde_json::Value>(&call.body)
        .ok()
        .is_some_and(|v| v["poison"] == serde_json::json!(true));
    if poison {
        Reply::status(422)
    } else {
        Reply::ok()
    }
}

type Behaviour = dyn Fn(&Call) -> Reply + Send + Sync;

pub struct Shared {
    pub calls: Mutex<Vec<Call>>,
    in_flight: Mutex<HashMap<String, usize>>,
    pub violations: Mutex<Vec<String>>,
    /// Each aggregate's event ids in stream order, as appended.
    pub expected: Mutex<HashMap<String, Vec<String>>>,
    behave: Mutex<Arc<Behaviour>>,
}

impl Shared {
    /// Ids answered 2xx, per aggregate, in the order of their first success.
    pub fn delivered(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for c in self.calls.lock().expect("lock").iter() {
            if (200..300).contains(&c.status) {
                let ids = out.entry(c.aggregate.clone()).or_default();
                if !ids.contains(&c.id) {
                    ids.push(c.id.clone());
                }
            }
        }
        out
    }

    pub fn succeeded(&self, id: &str) -> bool {
        self.calls
            .lock()
            .expect("lock")
            .iter()
            .any(|c| c.id == id && (200..300).contains(&c.status))
    }

    pub fn set(&self, behave: impl Fn(&Call) -> Reply + Send + Sync + 'static) {
        *self.behave.lock().expect("lock") = Arc::new(behave);
    }
}

/// The endpoint: a real HTTP server on a loopback port, stoppable and restartable on the same port.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

async fn handle(shared: Arc<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let aggregate = header("ce-subject");
    let id = header("ce-id");
    let started = Instant::now();
    {
        let mut in_flight = shared.in_flight.lock().expect("lock");
        let n = in_flight.entry(aggregate.clone()).or_default();
        if *n > 0 {
            shared
                .violations
                .lock()
                .expect("lock")
                .push(format!("{id}: a call for {aggregate} while another runs"));
        }
        *n += 1;
    }
    let expected = shared
        .expected
        .lock()
        .expect("lock")
        .get(&aggregate)
        .cloned();
    if let Some(ids) = expected
        && let Some(pos) = ids.iter().position(|i| *i == id)
    {
        for earlier in &ids[..pos] {
            if !shared.succeeded(earlier) {
                shared.violations.lock().expect("lock").push(format!(
                    "{id} delivered before {earlier} of {aggregate} was done"
                ));
            }
        }
    }
    let mut call = Call {
        aggregate: aggregate.clone(),
        id,
        sequence: header("projectionist-sequence").parse().unwrap_or(0),
        attempt: header("projectionist-attempt").parse().unwrap_or(0),
        status: 0,
        started,
        ended: started,
        body,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
    };
    let behave = shared.behave.lock().expect("lock").clone();
    let reply = behave(&call);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    call.status = reply.status;
    call.ended = Instant::now();
    *shared
        .in_flight
        .lock()
        .expect("lock")
        .entry(aggregate)
        .or_default() -= 1;
    shared.calls.lock().expect("lock").push(call);
    let status = StatusCode::from_u16(reply.status).expect("status");
    let mut response = match reply.emit {
        Some(body) => (
            status,
            [("content-type", "application/cloudevents-batch+json")],
            body,
        )
            .into_response(),
        None => (status, "").into_response(),
    };
    if let Some(after) = reply.retry_after {
        response
            .headers_mut()
            .insert("retry-after", after.to_string().parse().expect("header"));
    }
    response
}

impl Endpoint {
    pub async fn start(behave: impl Fn(&Call) -> Reply + Send + Sync + 'static) -> Self {
        let shared = Arc::new(Shared {
            calls: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            expected: Mutex::new(HashMap::new()),
            behave: Mutex::new(Arc::new(behave)),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut endpoint = Self {
            addr,
            shared,
            task: None,
        };
        endpoint.serve(listener);
        endpoint
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let shared = self.shared.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { handle(shared, headers, body).await }
            }),
        );
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Stops serving: connections are refused until [`Endpoint::restart`].
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind");
        self.serve(listener);
    }

    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().expect("lock").clone()
    }

    /// Asserts that every aggregate but those `except` got its events in the order appended, never went back to an
    /// earlier event (repeats are redeliveries of the same one), and never had two calls at once.
    pub fn assert_order(&self, except: &[&str]) {
        let expected = self.shared.expected.lock().expect("lock").clone();
        for (aggregate, ids) in &self.shared.delivered() {
            if !except.contains(&aggregate.as_str()) {
                assert_eq!(ids, &expected[aggregate], "order of {aggregate}");
            }
        }
        let calls = self.shared.calls.lock().expect("lock").clone();
        for (aggregate, ids) in &expected {
            let positions: Vec<usize> = calls
                .iter()
                .filter(|c| &c.aggregate == aggregate && (200..300).contains(&c.status))
                .filter_map(|c| ids.iter().position(|i| *i == c.id))
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] <= w[1]),
                "{aggregate}: {positions:?}"
            );
        }
        assert!(self.violations().is_empty(), "{:?}", self.violations());
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A config directory for `run` holding `reactor` of `store`.
pub fn config_dir(store: &EventStore, reactor: &Reactor) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    let config = projectionist_crds::reactor_config::resolve_reactor(store, reactor)
        .expect("resolves")
        .config;
    std::fs::write(
        dir.path().join("reactor.yaml"),
        config.to_yaml().expect("yaml"),
    )
    .expect("write");
    dir
}

/// A sidecar in this process running `reactor` of `store`.
pub async fn start_sidecar(
    nats: &projectionist_tests::nats::NatsServer,
    store: &EventStore,
    reactor: &Reactor,
) -> super::common::InProcess {
    let config = projectionist_crds::reactor_config::resolve_reactor(store, reactor)
        .expect("resolves")
        .config;
    super::common::InProcess::run(projectionist_sidecar::runtime::Workload {
        reactors: vec![projectionist_sidecar::runtime::ReactorLaunch {
            config,
            nats_url: Some(nats.url()),
        }],
        ..Default::default()
    })
    .await
}

/// A reactor on the ledger store delivering to `url`, with extra spec fields merged in.
pub fn reactor(url: &str, extra: serde_json::Value) -> Reactor {
    let mut spec = serde_json::json!({
        "eventStore": "bank",
        "endpoint": {"url": url, "timeout": "5s"},
        "startAt": {"policy": "All"},
        "ackWait": "1s",
        "delivery": {"concurrency": 4, "retry": {"initial": "20ms", "max": "2s"}, "maxAttempts": 0},
    });
    if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    let mut r = Reactor::new("notifier", serde_json::from_value(spec).expect("spec"));
    r.metadata.namespace = Some("test".into());
    r
}

/// The store's subject prefix (`test.bank`).
pub fn prefix(store: &EventStore) -> String {
    store.subjects()[0].trim_end_matches(".>").to_string()
}

/// Provisions the store, the reactor's consumer and its parking lot.
pub async fn provision(js: &jetstream::Context, store: &EventStore, reactor: &Reactor) {
    let manifests = projectionist_crds::manifest::Manifests {
        event_stores: vec![store.clone()],
        reactors: vec![reactor.clone()],
        ..Default::default()
    };
    projectionist_sidecar::provision::provision(js, &manifests)
        .await
        .expect("provisioned");
}

/// Appends one event `id` of type `type_` to aggregate `acct.<aggregate>` and records it as expected.
pub async fn append(
    js: &jetstream::Context,
    store: &EventStore,
    endpoint: &Endpoint,
    aggregate: &str,
    id: &str,
    data: serde_json::Value,
) {
    append_to(js, store, &endpoint.shared, aggregate, id, data).await;
}

/// [`append`], recording into the endpoint's shared state.
/// Appends event `e-<a>-<round>` to each of the aggregates `a0` … `a<aggregates - 1>`.
pub async fn append_round(
    js: &jetstream::Context,
    store: &EventStore,
    shared: &Shared,
    aggregates: usize,
    round: usize,
) {
    for a in 0..aggregates {
        append_to(
            js,
            store,
            shared,
            &format!("a{a}"),
            &format!("e-{a}-{round}"),
            serde_json::json!({}),
        )
        .await;
    }
}

pub async fn append_to(
    js: &jetstream::Context,
    store: &EventStore,
    shared: &Shared,
    aggregate: &str,
    id: &str,
    data: serde_json::Value,
) {
    let key = format!("acct.{aggregate}");
    shared
        .expected
        .lock()
        .expect("lock")
        .entry(key.clone())
        .or_default()
        .push(id.to_string());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", id);
    headers.insert("ce-type", "Tick");
    headers.insert("ce-source", "test");
    headers.insert("ce-subject", key.as_str());
    headers.insert("content-type", "application/json");
    let subject = format!("{}.{key}", prefix(store));
    for _ in 0..50 {
        if let Ok(ack) = js
            .publish_with_headers(subject.clone(), headers.clone(), data.to_string().into())
            .await
            && ack.await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("could not append {id}");
}
