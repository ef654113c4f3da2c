//! One delivery: an event sent to the reactor's endpoint in CloudEvents' HTTP binary mode, and the answer
//! classified — delivered (with the events it emits, if any), worth retrying (after `Retry-After` when given), or a
//! permanent failure.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};

use super::pool::Connections;

/// The media type of an answer whose events are appended to the store.
pub const EMIT_MEDIA_TYPE: &str = "application/cloudevents-batch+json";
/// The largest answer body read (emitted events): 64 MiB, as the event-store API's request limit.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// An event to deliver, as it was stored: borrowed from the message it came in (a live delivery) or owned (a held
/// event read back from the parking lot).
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its aggregate: the subject after the store's prefix.
    pub aggregate: Cow<'a, str>,
    /// Its headers as stored (the CloudEvents NATS binding).
    pub headers: Cow<'a, HeaderMap>,
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

/// The `ce-*` attributes of an event, from its headers or, for a structured CloudEvent, its JSON body, as the
/// request headers they become (validated once, however many attempts follow).
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    /// `ce-id`, …, `content-type` and `idempotency-key`, sorted by name.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body to send.
    pub body: Bytes,
}

impl Attributes {
    /// The event id: the value of `Idempotency-Key`.
    pub fn id(&self) -> &str {
        self.headers
            .iter()
            .find(|(name, _)| *name == IDEMPOTENCY_KEY)
            .and_then(|(_, value)| value.to_str().ok())
            .unwrap_or_default()
    }
}

const CE_ID: &str = "ce-id";
const CE_TYPE: &str = "ce-type";
const CE_SOURCE: &str = "ce-source";
const CE_SPECVERSION: &str = "ce-specversion";
const CE_SUBJECT: &str = "ce-subject";
const CE_TIME: &str = "ce-time";

/// The header names every delivery carries, made once.
const KNOWN: [HeaderName; 7] = [
    HeaderName::from_static(CE_ID),
    HeaderName::from_static(CE_TYPE),
    HeaderName::from_static(CE_SOURCE),
    HeaderName::from_static(CE_SPECVERSION),
    HeaderName::from_static(CE_SUBJECT),
    HeaderName::from_static(CE_TIME),
    CONTENT_TYPE,
];

/// A header the endpoint gets, or why the event cannot be sent over HTTP.
fn http_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let name = match KNOWN.iter().find(|k| k.as_str() == name) {
        Some(known) => known.clone(),
        None => HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("the event cannot be sent over HTTP: header {name:?}: {e}"))?,
    };
    let value = HeaderValue::from_str(value)
        .map_err(|e| format!("the event cannot be sent over HTTP: header {name}: {e}"))?;
    Ok((name, value))
}

/// The attributes of a stored event, or why it cannot be delivered (no id or type anywhere, or a value HTTP cannot
/// carry).
pub fn attributes(delivery: &Delivery) -> Result<Attributes, String> {
    // One pass over the stored headers: the `ce-*` ones become request headers as they are.
    let mut headers = Vec::with_capacity(12);
    let (mut identified, mut typed, mut content_type) = (false, false, None);
    let mut unsendable = None;
    for (name, values) in delivery.headers.iter() {
        let name: &str = name.as_ref();
        let Some(value) = values.first().map(|v| v.as_str()) else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value);
            continue;
        }
        if name.len() <= 3 || !name[..3].eq_ignore_ascii_case("ce-") {
            continue;
        }
        let lower: Cow<str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        match lower.as_ref() {
            CE_ID => identified = true,
            CE_TYPE => typed = true,
            _ => {}
        }
        match http_header(&lower, value) {
            Ok(header) => headers.push(header),
            Err(e) => unsendable = Some(e),
        }
    }
    if identified && typed {
        if let Some(e) = unsendable {
            return Err(e);
        }
        let defaults = [
            (CE_SPECVERSION, "1.0"),
            (CE_SOURCE, "projectionist"),
            (CE_SUBJECT, delivery.aggregate.as_ref()),
        ];
        for (name, value) in defaults {
            if !headers.iter().any(|(present, _)| present == name) {
                headers.push(http_header(name, value)?);
            }
        }
        headers.push(http_header(
            CONTENT_TYPE.as_str(),
            content_type.unwrap_or("application/json"),
        )?);
        return Ok(finish(headers, delivery.payload.clone()));
    }
    let event = crate::event::decode(
        delivery.sequence,
        &delivery.aggregate,
        Some(&delivery.headers),
        &delivery.payload,
    )
    .map_err(|e| format!("not a deliverable event: {e}"))?;
    let source = event.source.as_deref().unwrap_or("projectionist");
    let subject = event.subject.as_deref().unwrap_or(&delivery.aggregate);
    let mut headers = vec![
        http_header(CE_ID, &event.id)?,
        http_header(CE_SOURCE, source)?,
        http_header(CE_SPECVERSION, "1.0")?,
        http_header(CE_SUBJECT, subject)?,
        http_header(CE_TYPE, &event.type_)?,
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
    ];
    if let Some(time) = &event.time {
        headers.push(http_header(CE_TIME, time)?);
    }
    let body = Bytes::from(serde_json::to_vec(&event.data).unwrap_or_default());
    Ok(finish(headers, body))
}

/// The attributes with `Idempotency-Key` (the value of `ce-id`), sorted by header name.
fn finish(mut headers: Vec<(HeaderName, HeaderValue)>, body: Bytes) -> Attributes {
    if let Some((_, value)) = headers.iter().find(|(name, _)| name.as_str() == CE_ID) {
        headers.push((IDEMPOTENCY_KEY, value.clone()));
    }
    headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Attributes { headers, body }
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

/// The reactor's endpoint, over keep-alive HTTP/1.1 connections.
#[derive(Debug, Clone)]
pub struct Endpoint {
    connections: Arc<Connections>,
    timeout: Duration,
    reactor: HeaderValue,
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const PROJECTIONIST_SEQUENCE: HeaderName = HeaderName::from_static("projectionist-sequence");
const PROJECTIONIST_ATTEMPT: HeaderName = HeaderName::from_static("projectionist-attempt");
const PROJECTIONIST_REACTOR: HeaderName = HeaderName::from_static("projectionist-reactor");

impl Endpoint {
    /// The endpoint at `url`; calls longer than `timeout` count as transient failures.
    pub fn new(url: &str, timeout: Duration, reactor: &str) -> anyhow::Result<Self> {
        let url: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("endpoint URL {url:?}: {e}"))?;
        Ok(Self {
            connections: Arc::new(Connections::new(&url)?),
            timeout,
            reactor: HeaderValue::from_str(reactor)
                .map_err(|e| anyhow::anyhow!("reactor name {reactor:?}: {e}"))?,
        })
    }

    /// Closes the connections idle too long.
    pub fn close_idle(&self) {
        self.connections.close_idle();
    }

    /// Delivers one event: attempt `attempt` (1-based).
    pub async fn call(&self, attributes: &Attributes, sequence: u64, attempt: u32) -> Answer {
        let mut request = Request::new(Full::new(attributes.body.clone()));
        *request.method_mut() = hyper::Method::POST;
        let headers = request.headers_mut();
        headers.reserve(attributes.headers.len() + 4);
        for (name, value) in &attributes.headers {
            headers.append(name.clone(), value.clone());
        }
        headers.insert(PROJECTIONIST_SEQUENCE, HeaderValue::from(sequence));
        headers.insert(PROJECTIONIST_ATTEMPT, HeaderValue::from(attempt));
        headers.insert(PROJECTIONIST_REACTOR, self.reactor.clone());
        let call = async {
            let (response, connection) = self.connections.send(request).await?;
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
            if body.is_ok() {
                self.connections.keep(connection);
            }
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
            headers: Cow::Owned(headers),
            payload: Bytes::from_static(b"{\"name\":\"Ada\"}"),
        };
        let a = attributes(&d).expect("deliverable");
        assert_eq!(a.id(), "e-1");
        let names: Vec<&str> = a.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce-id",
                "ce-source",
                "ce-specversion",
                "ce-subject",
                "ce-traceparent",
                "ce-type",
                "content-type",
                "idempotency-key"
            ]
        );
        let value = |name: &str| {
            a.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().expect("text"))
        };
        assert_eq!(value("idempotency-key"), Some("e-1"));
        assert_eq!(value("ce-subject"), Some("user.u-1"));
        assert_eq!(value("ce-specversion"), Some("1.0"));
        assert_eq!(a.body, d.payload);

        let structured = Delivery {
            headers: Cow::Owned(HeaderMap::new()),
            payload: Bytes::from_static(
                b"{\"specversion\":\"1.0\",\"id\":\"e-2\",\"type\":\"T\",\"source\":\"s\",\"data\":{\"x\":1}}",
            ),
            ..d.clone()
        };
        let a = attributes(&structured).expect("deliverable");
        assert_eq!(a.id(), "e-2");
        assert_eq!(&a.body[..], b"{\"x\":1}");

        let junk = Delivery {
            headers: Cow::Owned(HeaderMap::new()),
            payload: Bytes::from_static(b"\xff"),
            ..d
        };
        assert!(attributes(&junk).is_err());
    }
}
