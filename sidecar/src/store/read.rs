//! Reading an aggregate: its version (the sequence of its last event) and its events in stream order, streamed from
//! an ordered consumer on its subject and bounded by the version the read began at.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Aggregate, Store};
use crate::event::{self, Event};

/// How long a read waits for the next message of an aggregate before giving up.
const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// NATS cannot be reached or did not answer.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
}

impl Store {
    /// The aggregate's version: the sequence of its last event, 0 when it has none.
    pub async fn version(&self, aggregate: &Aggregate) -> Result<u64, ReadError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| ReadError::Unavailable(format!("stream {}: {e}", self.stream)))?;
        match stream
            .get_last_raw_message_by_subject(&self.stored_subject(aggregate))
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(0)
            }
            Err(e) => Err(ReadError::Unavailable(e.to_string())),
        }
    }

    /// The aggregate's events after version `after`, in stream order, up to `limit` of them and never past the
    /// version it had when the read began (the answer is one consistent snapshot). Streamed: nothing is held but
    /// the event in hand.
    pub async fn read(
        &self,
        aggregate: &Aggregate,
        after: u64,
        limit: Option<u64>,
    ) -> Result<Read, ReadError> {
        let version = self.version(aggregate).await?;
        let wanted = match limit {
            _ if version <= after => 0,
            Some(l) => l.min(version - after),
            None => version - after,
        };
        if wanted == 0 {
            return Ok(Read {
                version,
                messages: futures::stream::empty().boxed(),
            });
        }
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.stored_subject(aggregate),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        let messages = reader
            .messages()
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        // Ends right after the event at `version` (or `wanted` events) without waiting for more: the ordered
        // consumer would otherwise wait for the aggregate's next event.
        let events = futures::stream::unfold(
            (messages, false, 0u64),
            move |(mut messages, done, taken)| async move {
                if done || taken >= wanted {
                    return None;
                }
                match tokio::time::timeout(READ_IDLE_TIMEOUT, messages.next()).await {
                    Err(_) => Some((
                        Err(ReadError::Unavailable(
                            "no message from NATS in time".into(),
                        )),
                        (messages, true, taken),
                    )),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => Some((
                        Err(ReadError::Unavailable(e.to_string())),
                        (messages, true, taken),
                    )),
                    Ok(Some(Ok(m))) => {
                        let stored = stored(&m);
                        let sequence = stored.sequence();
                        (sequence <= version)
                            .then(|| (Ok(stored), (messages, sequence >= version, taken + 1)))
                    }
                }
            },
        )
        .boxed();
        Ok(Read {
            version,
            messages: events,
        })
    }
}

/// An aggregate's events as they are read.
pub struct Read {
    /// The aggregate's version when the read began.
    pub version: u64,
    /// Its events after the requested version, in stream order.
    pub messages: futures::stream::BoxStream<'static, Result<Stored, ReadError>>,
}

impl std::fmt::Debug for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Read")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// One stored message of an aggregate.
#[derive(Debug, Clone)]
pub enum Stored {
    /// A CloudEvent, and its data as stored (verbatim, unlike the decoded event's).
    Event {
        /// The event.
        event: Event,
        /// Its data: a binary-mode event's body, a structured one's `data` member; `null` when it has none.
        data: Box<RawValue>,
    },
    /// A message that is not a usable event (written by another client); shown with the reason, never dropped.
    Undecodable {
        /// Its stream sequence.
        sequence: u64,
        /// Its `Nats-Msg-Id`, if any.
        id: Option<String>,
        /// Why it does not decode.
        reason: String,
    },
}

impl Stored {
    /// The stream sequence.
    pub fn sequence(&self) -> u64 {
        match self {
            Self::Event { event, .. } => event.sequence,
            Self::Undecodable { sequence, .. } => *sequence,
        }
    }
}

fn stored(m: &jetstream::Message) -> Stored {
    let sequence = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    match event::decode(sequence, m.subject.as_str(), m.headers.as_ref(), &m.payload) {
        Ok(event) => {
            let data = stored_data(m.headers.as_ref(), &m.payload)
                .or_else(|| serde_json::value::to_raw_value(&event.data).ok())
                .unwrap_or_default();
            Stored::Event { event, data }
        }
        Err(e) => Stored::Undecodable {
            sequence,
            id: m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string()),
            reason: e.to_string(),
        },
    }
}

/// The data of an event as stored, verbatim: a binary-mode event's body, a structured one's `data` member.
fn stored_data(headers: Option<&HeaderMap>, payload: &[u8]) -> Option<Box<RawValue>> {
    #[derive(Deserialize)]
    struct Structured<'a> {
        #[serde(borrow, default)]
        data: Option<&'a RawValue>,
    }
    if event::is_structured(headers) {
        let body: Structured = serde_json::from_slice(payload).ok()?;
        return Some(body.data.map(RawValue::to_owned).unwrap_or_default());
    }
    if payload.is_empty() {
        return Some(Box::default());
    }
    serde_json::from_slice::<&RawValue>(payload)
        .ok()
        .map(RawValue::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_read_as_stored_in_either_mode() {
        let mut binary = HeaderMap::new();
        binary.insert("ce-type", "Tick");
        let raw = |h: Option<&HeaderMap>, p: &[u8]| stored_data(h, p).map(|d| d.get().to_string());
        assert_eq!(
            raw(Some(&binary), br#"{"z":1,"a":12345678901234567890123}"#).as_deref(),
            Some(r#"{"z":1,"a":12345678901234567890123}"#)
        );
        assert_eq!(raw(Some(&binary), b"").as_deref(), Some("null"));
        let structured = br#"{"type":"Tick","id":"e1","data":{"z":[1.50]}}"#;
        assert_eq!(raw(None, structured).as_deref(), Some(r#"{"z":[1.50]}"#));
        assert_eq!(
            raw(None, br#"{"type":"Tick","id":"e1"}"#).as_deref(),
            Some("null")
        );
        assert_eq!(raw(Some(&binary), b"not json"), None);
    }
}
