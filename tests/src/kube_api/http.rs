//! The emulator's HTTP surface: path routing, discovery, list/watch, and the write verbs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::Shared;
use super::select::{FieldSelector, LabelSelector};
use super::store::{self, ApiError, Kind, WriteOptions};

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn error_response(error: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error.to_status(),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// What a path names.
#[derive(Debug)]
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Discovery(Value),
    Resource(Target),
}

fn route(shared: &Shared, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let store = shared.store();
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            return Ok(Route::Discovery(
                json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-projectionist-emulator", "platform": "linux/amd64"}),
            ));
        }
        ["api"] => {
            return Ok(Route::Discovery(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            ));
        }
        ["apis"] => {
            let mut groups: Vec<(String, String)> = store
                .kinds()
                .iter()
                .filter(|k| !k.group.is_empty())
                .map(|k| (k.group.clone(), k.version.clone()))
                .collect();
            groups.sort();
            groups.dedup();
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, v)| {
                    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                    json!({"name": g, "versions": [gv], "preferredVersion": gv})
                })
                .collect();
            return Ok(Route::Discovery(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ));
        }
        ["apis", g] => {
            let k = store
                .kinds()
                .iter()
                .find(|k| k.group == *g)
                .ok_or_else(not_found)?;
            let gv = json!({"groupVersion": format!("{g}/{}", k.version), "version": k.version});
            return Ok(Route::Discovery(
                json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv], "preferredVersion": gv}),
            ));
        }
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return Err(not_found()),
    };
    if rest.is_empty() {
        let resources: Vec<Value> = store
            .kinds()
            .iter()
            .filter(|k| k.group == group && k.version == version)
            .flat_map(|k| {
                let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
                let mut out = vec![json!({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced,
                    "kind": k.kind, "verbs": verbs, "shortNames": k.short_names})];
                if k.status {
                    out.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                        "kind": k.kind, "verbs": ["get", "patch", "update"]}));
                }
                out
            })
            .collect();
        if resources.is_empty() {
            return Err(not_found());
        }
        let gv = if group.is_empty() {
            version.clone()
        } else {
            format!("{group}/{version}")
        };
        return Ok(Route::Discovery(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        ));
    }
    let owned = |s: &&str| s.to_string();
    let (namespace, plural, name, subresource) = match rest {
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => (
            None,
            "namespaces".to_string(),
            Some(name.to_string()),
            Some(sub.to_string()),
        ),
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => (
            Some(ns.to_string()),
            plural.to_string(),
            tail.first().map(owned),
            tail.get(1).map(owned),
        ),
        [plural, tail @ ..] if tail.len() <= 2 => (
            None,
            plural.to_string(),
            tail.first().map(owned),
            tail.get(1).map(owned),
        ),
        _ => return Err(not_found()),
    };
    let kind = store.kind(&group, &plural)?;
    if kind.version != version {
        return Err(not_found());
    }
    if let Some(sub) = &subresource
        && !(sub == "status" && kind.status)
    {
        return Err(not_found());
    }
    if !kind.namespaced && namespace.is_some() {
        return Err(not_found());
    }
    Ok(Route::Resource(Target {
        group,
        version,
        namespace,
        plural,
        name,
        subresource,
    }))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match serve(&shared, &method, &uri, &headers, &body).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if content_type.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn manager(params: &HashMap<String, String>, headers: &HeaderMap) -> String {
    params.get("fieldManager").cloned().unwrap_or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .unwrap_or("unknown")
            .to_string()
    })
}

async fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let target = match route(shared, uri.path())? {
        Route::Discovery(value) if method == Method::GET => {
            return Ok(json_response(StatusCode::OK, &value));
        }
        Route::Discovery(_) => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method",
            ));
        }
        Route::Resource(t) => t,
    };
    let params = query(uri);
    let kind: Kind = shared.store().kind(&target.group, &target.plural)?.clone();
    let ns = target.namespace.as_deref();
    let options = WriteOptions {
        manager: manager(&params, headers),
        subresource: target.subresource.clone(),
        strict: params.get("fieldValidation").is_some_and(|v| v == "Strict"),
        force: params.get("force").is_some_and(|v| v == "true"),
    };
    let _ = &target.version;
    match (method, &target.name) {
        (&Method::GET, None) => {
            if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(shared, &kind, ns, &params);
            }
            list(shared, &kind, ns, &params, headers)
        }
        (&Method::GET, Some(name)) => {
            let object = shared.store().get(&kind, ns, name)?;
            Ok(json_response(StatusCode::OK, &object))
        }
        (&Method::POST, None) => {
            let mut object = parse_body(headers, body)?;
            if kind.group.is_empty() && kind.plural == "pods" {
                let namespace = ns.unwrap_or("default");
                {
                    let store = shared.store();
                    store
                        .kind("", "namespaces")
                        .and_then(|k| store.get(k, None, namespace))
                        .map_err(|_| {
                            ApiError::new(
                                404,
                                "NotFound",
                                format!("namespaces \"{namespace}\" not found"),
                            )
                        })?;
                }
                object = super::admission::mutate_pod(shared, namespace, object).await?;
            }
            let created = shared.store().create(&kind, ns, object, &options)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::PUT, Some(name)) => {
            let object = parse_body(headers, body)?;
            let body_name = object.pointer("/metadata/name").and_then(Value::as_str);
            if body_name.is_some_and(|n| n != name) {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name in the URL",
                ));
            }
            let replaced = shared.store().replace(&kind, ns, name, object, &options)?;
            Ok(json_response(StatusCode::OK, &replaced))
        }
        (&Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let patch_type = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    "merge"
                }
                "application/json-patch+json" => "json",
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => "apply",
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            let patch = if patch_type == "apply" {
                serde_yaml::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid apply body: {e}")))?
            } else {
                serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?
            };
            let patched = shared
                .store()
                .patch(&kind, ns, name, patch_type, patch, &options)?;
            Ok(json_response(StatusCode::OK, &patched))
        }
        (&Method::DELETE, Some(name)) => {
            let delete_options: Value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(body).unwrap_or(Value::Null)
            };
            let uid = delete_options
                .pointer("/preconditions/uid")
                .and_then(Value::as_str);
            let rv = delete_options
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str);
            let deleted = shared.store().delete(&kind, ns, name, uid, rv)?;
            Ok(json_response(StatusCode::OK, &deleted))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", uri.path()),
        )),
    }
}

fn selectors(params: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(params.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(params.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn selected(object: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    labels.matches(
        object
            .pointer("/metadata/labels")
            .and_then(Value::as_object),
    ) && fields.matches(object)
}

fn list(
    shared: &Shared,
    kind: &Kind,
    namespace: Option<&str>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(params)?;
    let store = shared.store();
    if params
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact")
        && let Some(rv) = params
            .get("resourceVersion")
            .and_then(|r| r.parse::<u64>().ok())
        && store.changes_since(rv).is_none()
    {
        return Err(ApiError::new(
            410,
            "Expired",
            format!(
                "too old resource version: {rv} ({})",
                store.resource_version()
            ),
        ));
    }
    let mut items: Vec<Value> = store
        .list(kind, namespace)
        .into_iter()
        .filter(|o| selected(o, &labels, &fields))
        .collect();
    let mut rv = store.resource_version();
    // Pagination: `continue` names the last (namespace, name) served and the list's resourceVersion.
    if let Some(token) = params.get("continue").filter(|t| !t.is_empty()) {
        use base64::Engine;
        let bad = || ApiError::bad_request("the provided continue parameter is invalid");
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| bad())?;
        let cursor: Value = serde_json::from_slice(&decoded).map_err(|_| bad())?;
        let after = (
            cursor["ns"].as_str().unwrap_or_default().to_string(),
            cursor["name"].as_str().unwrap_or_default().to_string(),
        );
        rv = cursor["rv"].as_u64().ok_or_else(bad)?;
        items.retain(|o| store::ident(o) > after);
    }
    let mut next = None;
    if let Some(limit) = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        use base64::Engine;
        let remaining = items.len() - limit;
        items.truncate(limit);
        let (ns, name) = items.last().map(store::ident).unwrap_or_default();
        let token = json!({"ns": ns, "name": name, "rv": rv}).to_string();
        next = Some((
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token),
            remaining,
        ));
    }
    let as_table = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let mut body = if as_table {
        store::table(kind, &items, rv)
    } else {
        store::list_object(kind, items, rv)
    };
    if let Some((token, remaining)) = next {
        body["metadata"]["continue"] = json!(token);
        body["metadata"]["remainingItemCount"] = json!(remaining);
    }
    Ok(json_response(StatusCode::OK, &body))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn gone(rv: &str) -> Bytes {
    let status =
        ApiError::new(410, "Expired", format!("too old resource version: {rv}")).to_status();
    event_line("ERROR", &status)
}

fn watch(
    shared: &Arc<Shared>,
    kind: &Kind,
    namespace: Option<&str>,
    params: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(params)?;
    let requested = params.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(std::time::Duration::from_secs(1800));
    let matches = {
        let kind = kind.clone();
        let namespace = namespace.map(str::to_string);
        move |group: &str, plural: &str, ns: &str, object: &Value| {
            group == kind.group
                && plural == kind.plural
                && namespace.as_deref().is_none_or(|n| n == ns)
                && selected(object, &labels, &fields)
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    // Snapshot and subscribe under one lock, so nothing falls between the backlog and the live changes.
    let (backlog, mut live, mut last_rv) = {
        let store = shared.store();
        let live = store.changes.subscribe();
        let current = store.resource_version();
        let backlog: Result<Vec<Bytes>, Bytes> = match requested.parse::<u64>() {
            Ok(rv) if rv > 0 => match store.changes_since(rv) {
                Some(changes) => Ok(changes
                    .iter()
                    .filter_map(|c| seen_as(c, &matches).map(|k| event_line(k, &c.object)))
                    .collect()),
                None => Err(gone(&requested)),
            },
            _ => Ok(store
                .list(kind, namespace)
                .iter()
                .filter(|o| selected_ns(o, &matches, kind))
                .map(|o| event_line("ADDED", o))
                .collect()),
        };
        (backlog, live, current)
    };
    let mut shutdown = shared.shutdown.clone();
    let bookmark_interval = shared.options.bookmark_interval;
    let api_version = kind.api_version();
    let kind_name = kind.kind.clone();
    tokio::spawn(async move {
        let lines = match backlog {
            Ok(lines) => lines,
            Err(error) => {
                let _ = tx.send(error).await;
                return;
            }
        };
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            let line = tokio::select! {
                _ = &mut deadline => return,
                _ = shutdown.changed() => return,
                _ = ticker.tick(), if bookmarks => {
                    let bookmark = json!({"apiVersion": api_version, "kind": kind_name,
                        "metadata": {"resourceVersion": last_rv.to_string()}});
                    event_line("BOOKMARK", &bookmark)
                }
                change = live.recv() => match change {
                    Ok(c) => {
                        last_rv = last_rv.max(c.rv);
                        let Some(as_kind) = seen_as(&c, &matches) else {
                            continue;
                        };
                        event_line(as_kind, &c.object)
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(gone(&last_rv.to_string())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// How a watch with `matches` sees a change: an object modified into its selection is `ADDED`, out of it
/// `DELETED` (as the API server's watch cache reports it); `None` when the watch does not see it at all.
fn seen_as(
    change: &store::Change,
    matches: &impl Fn(&str, &str, &str, &Value) -> bool,
) -> Option<&'static str> {
    let now = matches(
        &change.group,
        &change.plural,
        &change.namespace,
        &change.object,
    );
    let before = change
        .previous
        .as_ref()
        .map(|p| matches(&change.group, &change.plural, &change.namespace, p));
    match (change.kind, before, now) {
        ("MODIFIED", Some(false), true) => Some("ADDED"),
        ("MODIFIED", Some(true), false) => Some("DELETED"),
        (kind, _, true) => Some(kind),
        _ => None,
    }
}

fn selected_ns(
    object: &Value,
    matches: &impl Fn(&str, &str, &str, &Value) -> bool,
    kind: &Kind,
) -> bool {
    let ns = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    matches(&kind.group, &kind.plural, ns, object)
}
