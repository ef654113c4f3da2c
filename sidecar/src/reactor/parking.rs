//! The parking lot: a reactor's held events in a JetStream stream of their own (a reactor has no database), one
//! subject per aggregate — `<parking prefix>.<aggregate>` — so an aggregate's held events stay in stream order and
//! survive restarts, redeliveries and a failover to another replica. A held event keeps its original headers and
//! body, plus its original sequence, subject and the reason it was parked.

use std::borrow::Cow;
use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::StreamMessage, stream::Stream};
use bytes::Bytes;
use futures::TryStreamExt;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use super::deliver::Delivery;

/// Header: the held event's original stream sequence.
pub const SEQUENCE: &str = "Projectionist-Sequence";
/// Header: the held event's aggregate.
pub const AGGREGATE: &str = "Projectionist-Aggregate";
/// Header: why it was parked.
pub const REASON: &str = "Projectionist-Reason";

/// A parked aggregate, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Parked {
    /// `<type>.<id>`.
    pub aggregate: String,
    /// Events held.
    pub events: u64,
    /// Original sequence of the first held event (the one that failed).
    pub first_sequence: u64,
    /// Original sequence of the last held event.
    pub last_sequence: u64,
    /// Why the first held event failed.
    pub reason: String,
    /// When the first held event was parked (RFC 3339).
    pub parked_at: String,
}

/// The parking lot of one reactor.
#[derive(Debug, Clone)]
pub struct ParkingLot {
    js: jetstream::Context,
    stream: Stream,
    prefix: String,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_string())
}

impl ParkingLot {
    /// Opens the lot's stream (provisioned with the reactor).
    pub async fn open(js: &jetstream::Context, stream: &str, prefix: &str) -> Result<Self, String> {
        let found = js
            .get_stream(stream)
            .await
            .map_err(|e| format!("the parking lot's stream {stream}: {e}"))?;
        Ok(Self {
            js: js.clone(),
            stream: found,
            prefix: prefix.to_string(),
        })
    }

    fn subject(&self, aggregate: &str) -> String {
        format!("{}.{aggregate}", self.prefix)
    }

    /// Every parked aggregate, read from the stream.
    pub async fn load(&self) -> Result<BTreeMap<String, Parked>, String> {
        let mut subjects = self
            .stream
            .info_with_subjects(format!("{}.>", self.prefix))
            .await
            .map_err(|e| format!("listing the parking lot: {e}"))?;
        let mut counts = Vec::new();
        while let Some((subject, count)) = subjects
            .try_next()
            .await
            .map_err(|e| format!("listing the parking lot: {e}"))?
        {
            counts.push((subject, count as u64));
        }
        let mut out = BTreeMap::new();
        for (subject, count) in counts {
            let Some(aggregate) = subject.strip_prefix(&format!("{}.", self.prefix)) else {
                continue;
            };
            if let Some(parked) = self.describe(aggregate, count).await? {
                out.insert(aggregate.to_string(), parked);
            }
        }
        Ok(out)
    }

    /// One aggregate's entry, read from the stream; `None` when it holds no event.
    pub async fn entry(&self, aggregate: &str) -> Result<Option<Parked>, String> {
        let mut subjects = self
            .stream
            .info_with_subjects(self.subject(aggregate))
            .await
            .map_err(|e| format!("reading the parking lot: {e}"))?;
        let mut count = 0;
        while let Some((_, n)) = subjects
            .try_next()
            .await
            .map_err(|e| format!("reading the parking lot: {e}"))?
        {
            count += n as u64;
        }
        self.describe(aggregate, count).await
    }

    /// One aggregate's entry, from its first and last held events; `None` when it holds none.
    pub async fn describe(&self, aggregate: &str, count: u64) -> Result<Option<Parked>, String> {
        let Some(first) = self.head(aggregate).await? else {
            return Ok(None);
        };
        let last = self
            .stream
            .get_last_raw_message_by_subject(&self.subject(aggregate))
            .await
            .map_err(|e| format!("reading the parking lot: {e}"))?;
        let seq = |m: &StreamMessage| {
            header(&m.headers, SEQUENCE)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        Ok(Some(Parked {
            aggregate: aggregate.to_string(),
            events: count,
            first_sequence: seq(&first),
            last_sequence: seq(&last),
            reason: header(&first.headers, REASON).unwrap_or_default(),
            parked_at: first.time.format(&Rfc3339).unwrap_or_default(),
        }))
    }

    /// Holds an event, behind the aggregate's earlier held events; returns once the server stored it.
    pub async fn park(&self, delivery: &Delivery<'_>, reason: &str) -> Result<(), String> {
        let mut headers = delivery.headers.clone().into_owned();
        headers.insert(SEQUENCE, delivery.sequence.to_string().as_str());
        headers.insert(AGGREGATE, delivery.aggregate.as_ref());
        headers.insert(REASON, reason.replace(['\r', '\n'], " ").as_str());
        // A redelivered event parked before is a duplicate the server drops.
        headers.insert(
            "Nats-Msg-Id",
            format!("parked-{}", delivery.sequence).as_str(),
        );
        self.js
            .publish_with_headers(
                self.subject(&delivery.aggregate),
                headers,
                delivery.payload.clone(),
            )
            .await
            .map_err(|e| format!("parking: {e}"))?
            .await
            .map_err(|e| format!("parking: {e}"))?;
        Ok(())
    }

    /// The aggregate's first held event, with its place in the lot.
    pub async fn head(&self, aggregate: &str) -> Result<Option<StreamMessage>, String> {
        self.next_after(aggregate, 0).await
    }

    /// The aggregate's first held event stored after lot sequence `after`.
    pub async fn next_after(
        &self,
        aggregate: &str,
        after: u64,
    ) -> Result<Option<StreamMessage>, String> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        match self
            .stream
            .get_first_raw_message_by_subject(self.subject(aggregate), after + 1)
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(format!("reading the parking lot: {e}")),
        }
    }

    /// Removes a held event by its place in the lot.
    pub async fn remove(&self, lot_sequence: u64) -> Result<(), String> {
        self.stream
            .delete_message(lot_sequence)
            .await
            .map(|_| ())
            .map_err(|e| format!("removing a held event: {e}"))
    }
}

/// A held event as it is delivered again.
pub fn delivery_of(held: &StreamMessage) -> Delivery<'static> {
    let sequence = header(&held.headers, SEQUENCE)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let aggregate = header(&held.headers, AGGREGATE).unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (name, values) in held.headers.iter() {
        let text: &str = name.as_ref();
        if [SEQUENCE, AGGREGATE, REASON, "Nats-Msg-Id"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(text))
        {
            continue;
        }
        for value in values {
            headers.append(text, value.as_str());
        }
    }
    Delivery {
        sequence,
        aggregate: Cow::Owned(aggregate),
        headers: Cow::Owned(headers),
        payload: Bytes::clone(&held.payload),
    }
}
