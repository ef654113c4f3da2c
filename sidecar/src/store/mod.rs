//! The event store on JetStream: appending an aggregate's events with optimistic concurrency — one event, or several
//! all or none with JetStream's atomic batch publish — and reading an aggregate's events back in stream order.
//! Shared by the event-store API and the `append` command. Reading lives in [`read`].
//!
//! An aggregate `(type, id)` lives on the subject `<store prefix>.<type>.<id>`. Its *version* is the stream sequence
//! of its last event (0 when it has none): opaque and increasing, not a count. An expected version is enforced by
//! the server (`Nats-Expected-Last-Subject-Sequence`), so nothing is read before an append.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{HeaderMap, client::RequestErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use projectionist_crds::partition::Layout;
use serde::Deserialize;

mod event;
mod read;

use event::invalid;
pub use event::{Aggregate, Invalid, NewEvent};
pub use read::{Read, ReadError, Stored};

/// JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence` check.
const WRONG_LAST_SEQUENCE: u64 = 10071;
/// The same check failing inside an atomic batch.
const WRONG_LAST_SEQUENCE_IN_BATCH: u64 = 10164;
/// A message larger than the stream's `max_msg_size`.
const MESSAGE_TOO_LARGE: u64 = 10054;
/// How long an append waits for the server's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a NATS connection that is not up before answering that NATS is unavailable.
pub const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// JetStream's error code for an atomic batch holding an id already in the duplicate window.
const DUPLICATE_IN_BATCH: u64 = 10201;
/// The most events one append may carry (JetStream's atomic batch limit).
pub const MAX_EVENTS: usize = 1000;

/// One EventStore the sidecar serves.
#[derive(Debug, Clone)]
pub struct Store {
    /// The EventStore's name, as the API addresses it.
    pub name: String,
    /// The stream.
    pub stream: String,
    /// The subject prefix aggregates live under (the store's first subject without `.>`).
    pub prefix: String,
    /// The NATS connection (core requests carry the batch protocol).
    client: async_nats::Client,
    /// JetStream on that connection.
    js: jetstream::Context,
    /// A partitioned store's layout: events are stored under `<prefix>.<partition>.<type>.<id>`.
    layout: Option<Layout>,
}

/// What an append expects of the aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Anything: no check.
    Any,
    /// The aggregate's version (0: it has no events yet).
    Version(u64),
}

impl From<Option<u64>> for Expected {
    fn from(v: Option<u64>) -> Self {
        v.map_or(Self::Any, Self::Version)
    }
}

/// A successful append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The aggregate's version after it: the sequence of the last event.
    pub version: u64,
    /// Each event's stream sequence, in request order.
    pub sequences: Vec<u64>,
    /// The events were appended before (a retried request): these are the original sequences.
    pub duplicate: bool,
}

/// Why an append did not happen. Nothing of the request was stored in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The input is invalid.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The expected version does not match.
    #[error("expected version {expected} but the aggregate is at version {current}")]
    Conflict {
        /// What the request expected.
        expected: u64,
        /// The aggregate's version now.
        current: u64,
    },
    /// Event ids of the request were already used for other events.
    #[error("{0}")]
    IdReused(String),
    /// An event is larger than NATS or the stream accepts.
    #[error("{0}")]
    TooLarge(String),
    /// NATS cannot be reached or did not answer in time; retrying later may succeed.
    #[error("NATS unavailable: {0}")]
    Unavailable(String),
    /// The server refused the append for another reason.
    #[error("the server refused the append: {0}")]
    Refused(String),
}

/// The pub ack as the server sends it (also for the commit of an atomic batch).
#[derive(Debug, Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// The subject prefix of a store: its first subject without the trailing `.>`.
pub fn subject_prefix(subjects: &[String]) -> Option<String> {
    subjects
        .first()
        .and_then(|s| s.strip_suffix(".>"))
        .map(str::to_string)
}

impl Store {
    /// A store over a connection.
    pub fn new(name: &str, stream: &str, prefix: &str, client: async_nats::Client) -> Self {
        Self {
            name: name.to_string(),
            stream: stream.to_string(),
            prefix: prefix.to_string(),
            js: jetstream::new(client.clone()),
            client,
            layout: None,
        }
    }

    /// The same store, partitioned into `partitions` (`None`: not partitioned).
    pub fn with_partitions(mut self, partitions: Option<u32>) -> Self {
        self.layout = partitions.map(|p| Layout::new(&self.prefix, p));
        self
    }

    /// The NATS subject an aggregate's events are published to.
    pub fn subject(&self, aggregate: &Aggregate) -> String {
        format!("{}.{}", self.prefix, aggregate.key())
    }

    /// The subject an aggregate's events are stored under: the published one, or on a partitioned store
    /// `<prefix>.<partition>.<type>.<id>`.
    pub fn stored_subject(&self, aggregate: &Aggregate) -> String {
        match &self.layout {
            Some(layout) => layout.stored(&aggregate.type_, &aggregate.id),
            None => self.subject(aggregate),
        }
    }

    /// The store's NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// JetStream on the store's connection.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Whether the connection is up, waiting up to [`CONNECT_WAIT`] for it (a sidecar just started, a server
    /// restarting); requests answer `Unavailable` when it is still down.
    pub async fn connected(&self) -> bool {
        let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
        while self.client.connection_state() != State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Appends `events` to `aggregate` if it is at `expected`: one event with a plain publish, several atomically
    /// with JetStream's atomic batch publish (the expectation checked on the first). A request whose events were all
    /// appended before (same ids, same aggregate) answers with the original sequences and `duplicate`.
    pub async fn append(
        &self,
        aggregate: &Aggregate,
        expected: Expected,
        events: &[NewEvent],
    ) -> Result<Appended, AppendError> {
        if events.is_empty() {
            return Err(invalid("events", "must hold at least one event").into());
        }
        if events.len() > MAX_EVENTS {
            return Err(invalid(
                "events",
                format!(
                    "at most {MAX_EVENTS} events per request, got {}",
                    events.len()
                ),
            )
            .into());
        }
        for (i, e) in events.iter().enumerate() {
            e.validate(format_args!("events[{i}]"))?;
            if let Some(j) = events[..i].iter().position(|o| o.id == e.id) {
                return Err(invalid(
                    format!("events[{i}].id"),
                    format!("{:?} is also the id of events[{j}]", e.id),
                )
                .into());
            }
        }
        if !self.connected().await {
            return Err(AppendError::Unavailable(format!(
                "not connected ({:?})",
                self.client.connection_state()
            )));
        }
        let subject = self.subject(aggregate);
        let max_payload = self.client.max_payload();
        let mut messages = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let headers = e.headers(aggregate);
            let size = e.data.len() + header_size(&headers) + 64;
            if max_payload > 0 && size > max_payload {
                return Err(AppendError::TooLarge(format!(
                    "events[{i}] is {size} bytes with its headers; NATS accepts at most {max_payload}"
                )));
            }
            messages.push((subject.clone(), headers, e.data.clone()));
        }
        let ack = if messages.len() == 1 {
            let (_, mut headers, data) = messages.remove(0);
            if let Expected::Version(v) = expected {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    v.to_string().as_str(),
                );
            }
            self.request(&subject, headers, data).await?
        } else {
            self.publish_batch(expected, messages).await?
        };
        match ack.error {
            None => {
                let n = events.len() as u64;
                if ack.duplicate {
                    return self.duplicate_at(aggregate, ack.seq, events).await;
                }
                let count = if ack.count == 0 { 1 } else { ack.count };
                if count != n || ack.seq < n {
                    return Err(AppendError::Refused(format!(
                        "the server stored {count} events of {n}"
                    )));
                }
                Ok(Appended {
                    version: ack.seq,
                    sequences: (ack.seq + 1 - n..=ack.seq).collect(),
                    duplicate: false,
                })
            }
            Some(err) => self.refused(aggregate, expected, events, err).await,
        }
    }

    /// Appends events of several aggregates at once, all or none, without expectations (the events a reactor
    /// emits). Events whose ids were appended before (the same answer to a redelivered event) are duplicates: the
    /// call succeeds and appends nothing. Answers the sequences, or none for a duplicate.
    pub async fn append_all(
        &self,
        events: &[(Aggregate, NewEvent)],
    ) -> Result<Vec<u64>, AppendError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if !self.connected().await {
            return Err(AppendError::Unavailable(format!(
                "not connected ({:?})",
                self.client.connection_state()
            )));
        }
        let max_payload = self.client.max_payload();
        let mut messages = Vec::with_capacity(events.len());
        for (i, (aggregate, e)) in events.iter().enumerate() {
            e.validate(format_args!("events[{i}]"))?;
            let headers = e.headers(aggregate);
            let size = e.data.len() + header_size(&headers) + 64;
            if max_payload > 0 && size > max_payload {
                return Err(AppendError::TooLarge(format!(
                    "events[{i}] is {size} bytes with its headers; NATS accepts at most {max_payload}"
                )));
            }
            messages.push((self.subject(aggregate), headers, e.data.clone()));
        }
        let ack = if messages.len() == 1 {
            let (subject, headers, data) = messages.remove(0);
            self.request(&subject, headers, data).await?
        } else {
            self.publish_batch(Expected::Any, messages).await?
        };
        match ack.error {
            None if ack.duplicate => Ok(Vec::new()),
            None => {
                let n = events.len() as u64;
                Ok((ack.seq + 1 - n.min(ack.seq)..=ack.seq).collect())
            }
            Some(err)
                if err.err_code == DUPLICATE_IN_BATCH || err.description.contains("duplicate") =>
            {
                Ok(Vec::new())
            }
            Some(err) if err.err_code == MESSAGE_TOO_LARGE => {
                Err(AppendError::TooLarge(err.description))
            }
            Some(err) => Err(AppendError::Refused(format!(
                "{} (code {})",
                err.description, err.err_code
            ))),
        }
    }

    /// Publishes an atomic batch: every message but the last without a reply, the last with the commit header as a
    /// request whose answer is the batch's pub ack. A lost connection mid-batch leaves a gap the server refuses.
    async fn publish_batch(
        &self,
        expected: Expected,
        messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<PubAck, AppendError> {
        let batch_id = batch_id();
        let last = messages.len();
        for (i, (subject, mut headers, data)) in messages.into_iter().enumerate() {
            let n = i + 1;
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", n.to_string().as_str());
            if n == 1
                && let Expected::Version(v) = expected
            {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    v.to_string().as_str(),
                );
            }
            if n == last {
                headers.insert("Nats-Batch-Commit", "1");
                return self.request(&subject, headers, data).await;
            }
            self.client
                .publish_with_headers(subject, headers, data)
                .await
                .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        }
        Err(invalid("events", "must hold at least one event").into())
    }

    async fn request(
        &self,
        subject: &str,
        headers: HeaderMap,
        data: Bytes,
    ) -> Result<PubAck, AppendError> {
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(data)
            .timeout(Some(ACK_TIMEOUT));
        let reply = self
            .client
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => AppendError::Unavailable(format!(
                    "no stream answers on {subject} (is the EventStore provisioned?)"
                )),
                RequestErrorKind::TimedOut => {
                    AppendError::Unavailable("no acknowledgement in time".into())
                }
                _ => AppendError::Unavailable(e.to_string()),
            })?;
        serde_json::from_slice(&reply.payload)
            .map_err(|e| AppendError::Refused(format!("unreadable acknowledgement: {e}")))
    }

    /// Maps a refused append to what it means for the caller.
    async fn refused(
        &self,
        aggregate: &Aggregate,
        expected: Expected,
        events: &[NewEvent],
        err: ApiError,
    ) -> Result<Appended, AppendError> {
        if err.err_code == MESSAGE_TOO_LARGE {
            return Err(AppendError::TooLarge(err.description));
        }
        // An atomic batch refuses event ids already in the duplicate window instead of acknowledging them as
        // duplicates: a retried request. Find the originals.
        // Its events lie after the version it expected, so only those are read.
        let after = match expected {
            Expected::Version(v) => v,
            Expected::Any => 0,
        };
        if err.err_code == DUPLICATE_IN_BATCH
            || err.description.contains("Nats-Msg-Id")
            || err.description.contains("duplicate message id")
        {
            return self.duplicate_of(aggregate, after, events).await;
        }
        if let (Expected::Version(want), WRONG_LAST_SEQUENCE | WRONG_LAST_SEQUENCE_IN_BATCH) =
            (expected, err.err_code)
        {
            // A retried request whose first attempt succeeded also fails its expectation: answer it as a duplicate.
            if let Ok(dup) = self.duplicate_of(aggregate, after, events).await {
                return Ok(dup);
            }
            let current = self.version(aggregate).await.map_err(|e| match e {
                ReadError::Unavailable(m) => AppendError::Unavailable(m),
            })?;
            return Err(AppendError::Conflict {
                expected: want,
                current,
            });
        }
        Err(AppendError::Refused(format!(
            "{} (code {})",
            err.description, err.err_code
        )))
    }

    /// A single event the server acknowledged as a duplicate of the one at `sequence`: the same request retried
    /// when that one is on this aggregate, an id reused otherwise.
    async fn duplicate_at(
        &self,
        aggregate: &Aggregate,
        sequence: u64,
        events: &[NewEvent],
    ) -> Result<Appended, AppendError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        let original = stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        if original.subject.as_str() != self.stored_subject(aggregate) {
            return Err(AppendError::IdReused(format!(
                "event id {:?} was already used for an event of another aggregate ({}); give every new event a \
                 new id",
                events.first().map(|e| e.id.as_str()).unwrap_or_default(),
                original.subject
            )));
        }
        Ok(Appended {
            version: sequence,
            sequences: vec![sequence],
            duplicate: true,
        })
    }

    /// The original sequences of a request whose events are already on the aggregate after version `after`, in
    /// request order; an error when any of its ids is missing there (used for another aggregate, or only some
    /// appended).
    async fn duplicate_of(
        &self,
        aggregate: &Aggregate,
        after: u64,
        events: &[NewEvent],
    ) -> Result<Appended, AppendError> {
        let wanted: BTreeMap<&str, usize> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect();
        let mut found = vec![0u64; events.len()];
        let mut missing = events.len();
        let unavailable = |e: ReadError| match e {
            ReadError::Unavailable(m) => AppendError::Unavailable(m),
        };
        let read = self
            .read(aggregate, after, None)
            .await
            .map_err(unavailable)?;
        let mut messages = std::pin::pin!(read.messages);
        while let Some(item) = messages.next().await {
            let (sequence, id) = match item.map_err(unavailable)? {
                Stored::Event { event, .. } => (event.sequence, event.id),
                Stored::Undecodable { sequence, id, .. } => (sequence, id.unwrap_or_default()),
            };
            if let Some(&i) = wanted.get(id.as_str())
                && found[i] == 0
            {
                found[i] = sequence;
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
        if missing > 0 {
            let ids: Vec<&str> = events
                .iter()
                .zip(&found)
                .filter(|(_, s)| **s > 0)
                .map(|(e, _)| e.id.as_str())
                .collect();
            return Err(AppendError::IdReused(if ids.is_empty() {
                "event ids of this request were already used for other events of the store \
                 (inside its duplicate window); give every new event a new id"
                    .to_string()
            } else {
                format!(
                    "only some events of this request were appended before ({}); a retried request must \
                     carry exactly the same events",
                    ids.join(", ")
                )
            }));
        }
        Ok(Appended {
            version: found.iter().copied().max().unwrap_or(0),
            sequences: found,
            duplicate: true,
        })
    }
}

/// The bytes headers take on the wire, roughly (`NATS/1.0\r\n` + `name: value\r\n` each + `\r\n`).
fn header_size(headers: &HeaderMap) -> usize {
    12 + headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum::<usize>()
}

/// A random batch id (22 alphanumeric characters, like a NUID).
fn batch_id() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(22)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_the_first_subject_without_its_wildcard() {
        assert_eq!(
            subject_prefix(&["ns.users.>".into()]).as_deref(),
            Some("ns.users")
        );
        assert_eq!(subject_prefix(&["ns.users.*".into()]), None);
        assert_eq!(subject_prefix(&[]), None);
        assert_eq!(batch_id().len(), 22);
    }
}
