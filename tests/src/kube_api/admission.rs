//! Mutating admission webhooks, called on pod create the way the API server calls them: every
//! MutatingWebhookConfiguration's webhooks whose rules cover `CREATE` of `pods`, whose `namespaceSelector` matches the
//! namespace's labels and whose `objectSelector` matches the pod's, in order (by configuration name, then as listed),
//! each over HTTPS verified against its `caBundle`, within its `timeoutSeconds`; a JSON patch in the response is
//! applied, a denial refuses the create, and a failed call refuses it too unless `failurePolicy: Ignore`.
//!
//! A webhook named by `clientConfig.service` is reached through the address the test routed that Service to
//! ([`super::KubeApi::route_service`]), with TLS server name `<service>.<namespace>.svc`; one named by
//! `clientConfig.url` at that URL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use super::Shared;
use super::store::ApiError;

/// Whether a `LabelSelector` (as JSON) matches `labels`; an absent selector matches everything.
fn selector_matches(selector: Option<&Value>, labels: Option<&Value>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let match_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|m| m.iter().all(|(k, v)| get(k) == v.as_str()));
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|list| {
            list.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or_default();
                let values: Vec<&str> = e["values"]
                    .as_array()
                    .map(|v| v.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let value = get(key);
                match e["operator"].as_str().unwrap_or_default() {
                    "In" => value.is_some_and(|v| values.contains(&v)),
                    "NotIn" => value.is_none_or(|v| !values.contains(&v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
        });
    match_labels && expressions
}

fn covers(list: &Value, wanted: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|v| v == "*" || v == wanted))
}

fn rule_matches(webhook: &Value) -> bool {
    webhook["rules"].as_array().is_some_and(|rules| {
        rules.iter().any(|r| {
            covers(&r["operations"], "CREATE")
                && covers(&r["apiGroups"], "")
                && covers(&r["apiVersions"], "v1")
                && covers(&r["resources"], "pods")
        })
    })
}

struct Call {
    name: String,
    webhook: Value,
}

/// Runs the mutating webhooks for a pod being created in `namespace`; returns the pod as mutated.
pub(super) async fn mutate_pod(
    shared: &Arc<Shared>,
    namespace: &str,
    mut pod: Value,
) -> Result<Value, ApiError> {
    let calls: Vec<Call> = {
        let store = shared.store();
        let ns_labels = store
            .kind("", "namespaces")
            .ok()
            .and_then(|k| store.get(k, None, namespace).ok())
            .and_then(|n| n.pointer("/metadata/labels").cloned());
        let Ok(kind) = store.kind(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ) else {
            return Ok(pod);
        };
        store
            .list(kind, None)
            .iter()
            .flat_map(|config| config["webhooks"].as_array().cloned().unwrap_or_default())
            .filter(rule_matches)
            .filter(|w| selector_matches(w.get("namespaceSelector"), ns_labels.as_ref()))
            .filter(|w| selector_matches(w.get("objectSelector"), pod.pointer("/metadata/labels")))
            .map(|w| Call {
                name: w["name"].as_str().unwrap_or_default().to_string(),
                webhook: w,
            })
            .collect()
    };
    for call in calls {
        let fail_open = call.webhook["failurePolicy"] == "Ignore";
        let timeout = Duration::from_secs(call.webhook["timeoutSeconds"].as_u64().unwrap_or(10));
        let outcome = tokio::time::timeout(timeout, invoke(shared, &call, namespace, &pod))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "context deadline exceeded after {}s",
                    timeout.as_secs()
                ))
            });
        match outcome {
            Ok(response) => {
                if response["allowed"] != true {
                    let message = response
                        .pointer("/status/message")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        format!(
                            "admission webhook \"{}\" denied the request: {message}",
                            call.name
                        ),
                    ));
                }
                if let Some(patch) = response["patch"].as_str() {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(patch)
                        .map_err(|e| {
                            webhook_failed(&call.name, &format!("patch is not base64: {e}"))
                        })?;
                    let ops: json_patch::Patch = serde_json::from_slice(&bytes).map_err(|e| {
                        webhook_failed(&call.name, &format!("patch is not a JSON patch: {e}"))
                    })?;
                    json_patch::patch(&mut pod, &ops).map_err(|e| {
                        webhook_failed(&call.name, &format!("the patch does not apply: {e}"))
                    })?;
                }
            }
            Err(e) if fail_open => {
                tracing::warn!(
                    webhook = call.name,
                    error = e,
                    "webhook failed; ignored (failurePolicy: Ignore)"
                );
            }
            Err(e) => return Err(webhook_failed(&call.name, &e)),
        }
    }
    Ok(pod)
}

fn webhook_failed(name: &str, error: &str) -> ApiError {
    ApiError::new(
        500,
        "InternalError",
        format!("Internal error occurred: failed calling webhook \"{name}\": {error}"),
    )
}

/// One HTTPS call; returns the AdmissionReview's `response`.
async fn invoke(
    shared: &Arc<Shared>,
    call: &Call,
    namespace: &str,
    pod: &Value,
) -> Result<Value, String> {
    let config = &call.webhook["clientConfig"];
    let (addr, server_name, path): (SocketAddr, String, String) = if let Some(service) =
        config.get("service")
    {
        let ns = service["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = service["name"].as_str().unwrap_or_default().to_string();
        let addr = shared
            .routes()
            .get(&(ns.clone(), name.clone()))
            .copied()
            .ok_or_else(|| format!("service \"{name}\" in namespace \"{ns}\" has no endpoints"))?;
        (
            addr,
            format!("{name}.{ns}.svc"),
            service["path"].as_str().unwrap_or("/").to_string(),
        )
    } else if let Some(url) = config["url"].as_str() {
        let rest = url
            .strip_prefix("https://")
            .ok_or("the webhook URL must be https")?;
        let (host_port, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let addr: SocketAddr = tokio::net::lookup_host(host_port)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let host = host_port
            .rsplit_once(':')
            .map_or(host_port, |(h, _)| h)
            .to_string();
        (addr, host, path)
    } else {
        return Err("clientConfig names neither a service nor a url".into());
    };
    let bundle = config["caBundle"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or("no caBundle to verify the webhook's certificate with")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bundle) {
        roots
            .add(cert.map_err(|e| format!("caBundle: {e}"))?)
            .map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("dial {addr}: {e}"))?;
    let name = ServerName::try_from(server_name.clone()).map_err(|e| e.to_string())?;
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: failed to verify certificate for {server_name}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let uid = format!("{:x}", rand::random::<u128>());
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:admin", "groups": ["system:masters", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    });
    // As in the API server, a pod created with generateName has no name yet when admission runs.
    if let Some(name) = pod.pointer("/metadata/name").and_then(Value::as_str) {
        review["request"]["name"] = json!(name);
    }
    let request = hyper::Request::post(path)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("host", server_name)
        .body(Full::new(bytes::Bytes::from(review.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "the server responded {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let review: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("the response is not an AdmissionReview: {e}"))?;
    let response = review
        .get("response")
        .cloned()
        .ok_or("the AdmissionReview has no response")?;
    if response["uid"] != uid.as_str() {
        return Err(format!(
            "expected response.uid={uid:?}, got {:?}",
            response["uid"]
        ));
    }
    Ok(response)
}
