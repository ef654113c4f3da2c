//! One delivery: an event sent to the reactor's endpoint in CloudEvents' HTTP binary mode, and the answer
//! classified — delivered (with the events it emits, if any), worth retrying (after `Retry-After` when given), or a
//! permanent failure.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The media type of an answer whose events are appended to the store.
pub const EMIT_MEDIA_TYPE: &str = "application/cloudevents-batch+json";
/// The largest answer body read (emitted events): 64 MiB, as the event-store API's request limit.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// An event to deliver, as it was stored.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its aggregate: the subject after the store's prefix.
    pub aggregate: String,
    /// Its headers as stored (the CloudEvents NATS binding).
    pub headers: HeaderMap,
    /// Its body.
    pub payload: Bytes,
}

/// What the endpoint's answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `2xx`: done. `emitted` holds the body of an `application/cloudevents-batch+json` answer.
    Delivered {
        /// Events to append.
        emitted: Option<Bytes>,
    },
    /// Worth another attempt: `5xx`, `429`, a timeout, a refused connection.
    Retry {
        /// `Retry-After` of a `429` or `503`.
        after: Option<Duration>,
        /// What happened.
        reason: String,
    },
    /// Any other answer (`4xx`, `3xx`): retrying cannot help.
    Permanent {
        /// What happened.
        reason: String,
    },
}

/// The `ce-*` attributes of an event, from its headers or, for a structured CloudEvent, its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    /// Header name (`ce-id`, …) and value, in order.
    pub headers: Vec<(String, String)>,
    /// The event id (`Idempotency-Key`).
    pub id: String,
    /// The body to send.
    pub body: Bytes,
    /// Its content type.
    pub content_type: String,
}

/// The attributes of a stored event, or why it cannot be delivered (no id or type anywhere).
pub fn attributes(delivery: &Delivery) -> Result<Attributes, String> {
    let header = |name: &str| delivery.headers.get(name).map(|v| v.as_str().to_string());
    if let (Some(id), Some(_)) = (header("ce-id"), header("ce-type")) {
        let mut headers: Vec<(String, String)> = delivery
            .headers
            .iter()
            .filter_map(|(name, values)| {
                let name: &str = name.as_ref();
                let lower = name.to_ascii_lowercase();
                lower
                    .starts_with("ce-")
                    .then(|| values.first().map(|v| (lower, v.as_str().to_string())))
                    .flatten()
            })
            .collect();
        if header("ce-specversion").is_none() {
            headers.push(("ce-specversion".into(), "1.0".into()));
        }
        if header("ce-source").is_none() {
            headers.push(("ce-source".into(), "projectionist".into()));
        }
        if header("ce-subject").is_none() {
            headers.push(("ce-subject".into(), delivery.aggregate.clone()));
        }
        headers.sort();
        return Ok(Attributes {
            headers,
            id,
            body: delivery.payload.clone(),
            content_type: header("content-type").unwrap_or_else(|| "application/json".into()),
        });
    }
    let event = crate::event::decode(
        delivery.sequence,
        &delivery.aggregate,
        Some(&delivery.headers),
        &delivery.payload,
    )
    .map_err(|e| format!("not a deliverable event: {e}"))?;
    let mut headers = vec![
        ("ce-id".to_string(), event.id.clone()),
        (
            "ce-source".to_string(),
            event.source.unwrap_or_else(|| "projectionist".into()),
        ),
        ("ce-specversion".to_string(), "1.0".to_string()),
        (
            "ce-subject".to_string(),
            event.subject.unwrap_or_else(|| delivery.aggregate.clone()),
        ),
        ("ce-type".to_string(), event.type_),
    ];
    if let Some(time) = event.time {
        headers.push(("ce-time".into(), time));
    }
    headers.sort();
    Ok(Attributes {
        headers,
        id: event.id,
        body: Bytes::from(serde_json::to_vec(&event.data).unwrap_or_default()),
        content_type: "application/json".into(),
    })
}

/// Classifies an answer by its status, its `Retry-After` header and its content type.
pub fn classify(status: u16, retry_after: Option<&str>, content_type: Option<&str>) -> Answer {
    match status {
        200..=299 => Answer::Delivered {
            emitted: content_type
                .is_some_and(|ct| {
                    ct.split(';')
                        .next()
                        .is_some_and(|e| e.trim().eq_ignore_ascii_case(EMIT_MEDIA_TYPE))
                })
                .then(Bytes::new),
        },
        429 | 503 => Answer::Retry {
            after: retry_after
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
            reason: format!("the endpoint answered {status}"),
        },
        500..=599 => Answer::Retry {
            after: None,
            reason: format!("the endpoint answered {status}"),
        },
        _ => Answer::Permanent {
            reason: format!("the endpoint answered {status}"),
        },
    }
}

/// The reactor's endpoint, with a pooled HTTP/1.1 client.
#[derive(Debug, Clone)]
pub struct Endpoint {
    client: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
    reactor: String,
}

impl Endpoint {
    /// The endpoint at `url`; calls longer than `timeout` count as transient failures.
    pub fn new(url: &str, timeout: Duration, reactor: &str) -> anyhow::Result<Self> {
        let url: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("endpoint URL {url:?}: {e}"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            url,
            timeout,
            reactor: reactor.to_string(),
        })
    }

    /// Delivers one event: attempt `attempt` (1-based).
    pub async fn call(&self, attributes: &Attributes, sequence: u64, attempt: u32) -> Answer {
        let mut request = Request::post(self.url.clone())
            .header("content-type", attributes.content_type.as_str())
            .header("idempotency-key", attributes.id.as_str())
            .header("projectionist-sequence", sequence)
            .header("projectionist-attempt", attempt)
            .header("projectionist-reactor", self.reactor.as_str());
        for (name, value) in &attributes.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = match request.body(Full::new(attributes.body.clone())) {
            Ok(r) => r,
            Err(e) => {
                return Answer::Permanent {
                    reason: format!("the event cannot be sent over HTTP: {e}"),
                };
            }
        };
        let call = async {
            let response = self.client.request(request).await.map_err(|e| {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text = format!("{text}: {s}");
                    source = s.source();
                }
                text
            })?;
            let status = response.status();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let (retry_after, content_type) = (header("retry-after"), header("content-type"));
            let answer = classify(
                status.as_u16(),
                retry_after.as_deref(),
                content_type.as_deref(),
            );
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes());
            Ok::<_, String>(match (answer, body) {
                (Answer::Delivered { emitted: Some(_) }, Ok(body)) => Answer::Delivered {
                    emitted: Some(body),
                },
                (Answer::Delivered { emitted: Some(_) }, Err(e)) => Answer::Retry {
                    after: None,
                    reason: format!("the answer's events could not be read: {e}"),
                },
                (Answer::Permanent { reason }, Ok(body)) if status != StatusCode::OK => {
                    Answer::Permanent {
                        reason: with_body(reason, &body),
                    }
                }
                (answer, _) => answer,
            })
        };
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Answer::Retry {
                after: None,
                reason: format!("no answer within {:?}", self.timeout),
            },
            Ok(Err(e)) => Answer::Retry {
                after: None,
                reason: format!("the call failed: {e}"),
            },
            Ok(Ok(answer)) => answer,
        }
    }
}

/// A failure's reason with the start of the answer's body, which usually says why.
fn with_body(reason: String, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text.chars().take(200).collect();
    let text = text.trim();
    if text.is_empty() {
        reason
    } else {
        format!("{reason}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status() {
        assert_eq!(
            classify(204, None, None),
            Answer::Delivered { emitted: None }
        );
        assert_eq!(
            classify(
                200,
                None,
                Some("application/cloudevents-batch+json; charset=utf-8")
            ),
            Answer::Delivered {
                emitted: Some(Bytes::new())
            }
        );
        assert!(matches!(
            classify(429, Some("3"), None),
            Answer::Retry { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            classify(503, Some("Wed, 21 Oct 2015 07:28:00 GMT"), None),
            Answer::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify(500, Some("3"), None),
            Answer::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify(422, None, None),
            Answer::Permanent { .. }
        ));
        assert!(matches!(
            classify(404, None, None),
            Answer::Permanent { .. }
        ));
        assert!(matches!(
            classify(301, None, None),
            Answer::Permanent { .. }
        ));
    }

    #[test]
    fn binary_events_keep_their_attributes_and_structured_ones_are_unwrapped() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "e-1");
        headers.insert("ce-id", "e-1");
        headers.insert("ce-type", "UserCreated");
        headers.insert("ce-traceparent", "00-abc");
        headers.insert("content-type", "application/json");
        let d = Delivery {
            sequence: 7,
            aggregate: "user.u-1".into(),
            headers,
            payload: Bytes::from_static(b"{\"name\":\"Ada\"}"),
        };
        let a = attributes(&d).expect("deliverable");
        assert_eq!(a.id, "e-1");
        let names: Vec<&str> = a.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce-id",
                "ce-source",
                "ce-specversion",
                "ce-subject",
                "ce-traceparent",
                "ce-type"
            ]
        );
        assert_eq!(a.body, d.payload);

        let structured = Delivery {
            headers: HeaderMap::new(),
            payload: Bytes::from_static(
                b"{\"specversion\":\"1.0\",\"id\":\"e-2\",\"type\":\"T\",\"source\":\"s\",\"data\":{\"x\":1}}",
            ),
            ..d.clone()
        };
        let a = attributes(&structured).expect("deliverable");
        assert_eq!(a.id, "e-2");
        assert_eq!(&a.body[..], b"{\"x\":1}");

        let junk = Delivery {
            headers: HeaderMap::new(),
            payload: Bytes::from_static(b"\xff"),
            ..d
        };
        assert!(attributes(&junk).is_err());
    }
}
