//! Desired vs actual stream and consumer configuration.
//!
//! The operator compares what a resource asks for with what the server has before it sends anything, and splits the
//! differences into changes the server applies in place and changes it would refuse (a stream's storage, a
//! consumer's start position, ...). An immutable change is reported on the resource instead of being sent to fail on
//! the server. Only the fields Projectionist manages are compared; server-side defaults and the server's own
//! `_nats.*` metadata are ignored.

use std::collections::BTreeMap;
use std::fmt::Debug;

use async_nats::jetstream::consumer;
use async_nats::jetstream::stream;

/// Whether the server accepts a change to a field on an existing stream or consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutability {
    /// Applied by an update.
    InPlace,
    /// Refused by the server: the stream or consumer would have to be recreated.
    Immutable,
}

/// One field that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// The field, in the server's JSON naming (`storage`, `deliver_policy`, ...).
    pub field: &'static str,
    /// What the resource asks for.
    pub desired: String,
    /// What the server has.
    pub actual: String,
    /// Whether the server can apply it.
    pub mutability: Mutability,
}

/// All differences between a desired and an actual config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// The differing fields, in a stable order.
    pub changes: Vec<FieldChange>,
}

impl ConfigDiff {
    /// Nothing differs.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes the server would refuse.
    pub fn immutable(&self) -> impl Iterator<Item = &FieldChange> {
        self.changes
            .iter()
            .filter(|c| c.mutability == Mutability::Immutable)
    }

    /// Whether any change needs recreating the object.
    pub fn has_immutable(&self) -> bool {
        self.immutable().next().is_some()
    }

    /// A one-line summary such as `storage: Memory → File (immutable); max_age: 0ns → 1h`.
    pub fn describe(&self) -> String {
        self.changes
            .iter()
            .map(|c| {
                let tag = if c.mutability == Mutability::Immutable {
                    " (immutable)"
                } else {
                    ""
                };
                format!("{}: {} → {}{tag}", c.field, c.actual, c.desired)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn compare<T: PartialEq + Debug>(
        &mut self,
        field: &'static str,
        desired: &T,
        actual: &T,
        mutability: Mutability,
    ) {
        if desired != actual {
            self.changes.push(FieldChange {
                field,
                desired: format!("{desired:?}"),
                actual: format!("{actual:?}"),
                mutability,
            });
        }
    }
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Metadata without the keys the server adds itself (`_nats.*`) and the one the sidecar reports through.
fn user_metadata(m: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter()
        .filter(|(k, _)| {
            !k.starts_with("_nats.") && k.as_str() != crate::consumer::METADATA_REBUILT_TOKEN
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A guard flag the server lets you set but never clear (`deny_delete`, `deny_purge`).
fn one_way_flag(desired: bool, actual: bool) -> Mutability {
    if actual && !desired {
        Mutability::Immutable
    } else {
        Mutability::InPlace
    }
}

/// Differences between the stream config a resource asks for and the one on the server.
pub fn diff_stream(desired: &stream::Config, actual: &stream::Config) -> ConfigDiff {
    use Mutability::{Immutable, InPlace};
    let mut d = ConfigDiff::default();
    d.compare("name", &desired.name, &actual.name, Immutable);
    d.compare("storage", &desired.storage, &actual.storage, Immutable);
    d.compare(
        "retention",
        &desired.retention,
        &actual.retention,
        Immutable,
    );
    d.compare(
        "subjects",
        &sorted(&desired.subjects),
        &sorted(&actual.subjects),
        InPlace,
    );
    let transform = |t: &Option<stream::SubjectTransform>| {
        t.as_ref()
            .map(|t| (t.source.clone(), t.destination.clone()))
    };
    // The partition layout: changing it would move aggregates between partitions.
    d.compare(
        "subject_transform",
        &transform(&desired.subject_transform),
        &transform(&actual.subject_transform),
        Immutable,
    );
    d.compare(
        "max_consumers",
        &desired.max_consumers,
        &actual.max_consumers,
        InPlace,
    );
    d.compare(
        "num_replicas",
        &desired.num_replicas,
        &actual.num_replicas,
        InPlace,
    );
    d.compare("discard", &desired.discard, &actual.discard, InPlace);
    d.compare(
        "discard_new_per_subject",
        &desired.discard_new_per_subject,
        &actual.discard_new_per_subject,
        InPlace,
    );
    d.compare("max_age", &desired.max_age, &actual.max_age, InPlace);
    d.compare("max_bytes", &desired.max_bytes, &actual.max_bytes, InPlace);
    d.compare(
        "max_msgs",
        &desired.max_messages,
        &actual.max_messages,
        InPlace,
    );
    d.compare(
        "max_msgs_per_subject",
        &desired.max_messages_per_subject,
        &actual.max_messages_per_subject,
        InPlace,
    );
    d.compare(
        "max_msg_size",
        &desired.max_message_size,
        &actual.max_message_size,
        InPlace,
    );
    d.compare(
        "duplicate_window",
        &desired.duplicate_window,
        &actual.duplicate_window,
        InPlace,
    );
    let compression =
        |c: &Option<stream::Compression>| c.clone().unwrap_or(stream::Compression::None);
    d.compare(
        "compression",
        &compression(&desired.compression),
        &compression(&actual.compression),
        InPlace,
    );
    let placement = |p: &Option<stream::Placement>| {
        p.as_ref()
            .map(|p| (p.cluster.clone().filter(|c| !c.is_empty()), sorted(&p.tags)))
            .filter(|(c, t)| c.is_some() || !t.is_empty())
    };
    d.compare(
        "placement",
        &placement(&desired.placement),
        &placement(&actual.placement),
        InPlace,
    );
    let description = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    d.compare(
        "description",
        &description(&desired.description),
        &description(&actual.description),
        InPlace,
    );
    d.compare(
        "metadata",
        &user_metadata(&desired.metadata),
        &user_metadata(&actual.metadata),
        InPlace,
    );
    d.compare(
        "deny_delete",
        &desired.deny_delete,
        &actual.deny_delete,
        one_way_flag(desired.deny_delete, actual.deny_delete),
    );
    d.compare(
        "deny_purge",
        &desired.deny_purge,
        &actual.deny_purge,
        one_way_flag(desired.deny_purge, actual.deny_purge),
    );
    d.compare(
        "allow_rollup_hdrs",
        &desired.allow_rollup,
        &actual.allow_rollup,
        InPlace,
    );
    d.compare(
        "allow_direct",
        &desired.allow_direct,
        &actual.allow_direct,
        InPlace,
    );
    // Enabling atomic batch publish in place is allowed; the server refuses to turn it off again.
    d.compare(
        "allow_atomic",
        &desired.allow_atomic_publish,
        &actual.allow_atomic_publish,
        one_way_flag(desired.allow_atomic_publish, actual.allow_atomic_publish),
    );
    d
}

/// The filter subjects of a consumer as one sorted list, whether the server keeps one or several.
fn filters(filter_subject: &str, filter_subjects: &[String]) -> Vec<String> {
    let mut all = filter_subjects.to_vec();
    if !filter_subject.is_empty() {
        all.push(filter_subject.to_string());
    }
    all.sort();
    all.dedup();
    all
}

/// Differences between the consumer config a resource asks for and the one on the server.
pub fn diff_consumer(desired: &consumer::pull::Config, actual: &consumer::Config) -> ConfigDiff {
    use Mutability::{Immutable, InPlace};
    let mut d = ConfigDiff::default();
    d.compare(
        "durable_name",
        &desired.durable_name,
        &actual.durable_name,
        Immutable,
    );
    d.compare(
        "deliver_policy",
        &desired.deliver_policy,
        &actual.deliver_policy,
        Immutable,
    );
    // Consumers provisioned with `Explicit` acknowledgements (before the sidecar acknowledged once per batch) keep
    // working as they are: the sidecar acknowledges each event on them.
    let legacy_explicit = desired.ack_policy == consumer::AckPolicy::All
        && actual.ack_policy == consumer::AckPolicy::Explicit;
    if !legacy_explicit {
        d.compare(
            "ack_policy",
            &desired.ack_policy,
            &actual.ack_policy,
            Immutable,
        );
    }
    d.compare(
        "replay_policy",
        &desired.replay_policy,
        &actual.replay_policy,
        Immutable,
    );
    d.compare(
        "max_waiting",
        &desired.max_waiting,
        &actual.max_waiting,
        Immutable,
    );
    d.compare(
        "priority_policy",
        &desired.priority_policy,
        &actual.priority_policy,
        InPlace,
    );
    d.compare(
        "priority_groups",
        &desired.priority_groups,
        &actual.priority_groups,
        InPlace,
    );
    d.compare(
        "priority_timeout",
        &desired.priority_timeout,
        &actual.priority_timeout,
        InPlace,
    );
    d.compare(
        "filter_subjects",
        &filters(&desired.filter_subject, &desired.filter_subjects),
        &filters(&actual.filter_subject, &actual.filter_subjects),
        InPlace,
    );
    d.compare("ack_wait", &desired.ack_wait, &actual.ack_wait, InPlace);
    d.compare(
        "max_deliver",
        &desired.max_deliver,
        &actual.max_deliver,
        InPlace,
    );
    d.compare("backoff", &desired.backoff, &actual.backoff, InPlace);
    d.compare(
        "max_ack_pending",
        &desired.max_ack_pending,
        &actual.max_ack_pending,
        InPlace,
    );
    d.compare("max_batch", &desired.max_batch, &actual.max_batch, InPlace);
    d.compare(
        "inactive_threshold",
        &desired.inactive_threshold,
        &actual.inactive_threshold,
        InPlace,
    );
    let description = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    d.compare(
        "description",
        &description(&desired.description),
        &description(&actual.description),
        InPlace,
    );
    d.compare(
        "metadata",
        &user_metadata(&desired.metadata),
        &user_metadata(&actual.metadata),
        InPlace,
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::consumer::{DeliverPolicy, IntoConsumerConfig};
    use std::time::Duration;

    fn stream_cfg() -> stream::Config {
        stream::Config {
            name: "s".into(),
            subjects: vec!["a.>".into()],
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        }
    }

    #[test]
    fn equal_stream_configs_have_no_diff_even_with_server_metadata() {
        let desired = stream_cfg();
        let mut actual = stream_cfg();
        actual.metadata.insert("_nats.req.level".into(), "0".into());
        assert!(diff_stream(&desired, &actual).is_empty());
    }

    #[test]
    fn storage_change_is_immutable_but_max_age_is_in_place() {
        let mut desired = stream_cfg();
        desired.storage = stream::StorageType::Memory;
        desired.max_age = Duration::from_secs(3600);
        let d = diff_stream(&desired, &stream_cfg());
        let fields: Vec<_> = d.changes.iter().map(|c| (c.field, c.mutability)).collect();
        assert_eq!(
            fields,
            vec![
                ("storage", Mutability::Immutable),
                ("max_age", Mutability::InPlace)
            ]
        );
        assert!(d.has_immutable());
        assert!(
            d.describe().contains("storage: File → Memory (immutable)"),
            "{}",
            d.describe()
        );
    }

    #[test]
    fn deny_flags_can_be_set_but_not_cleared() {
        let mut loosened = stream_cfg();
        loosened.deny_purge = false;
        assert!(diff_stream(&loosened, &stream_cfg()).has_immutable());
        let d = diff_stream(&stream_cfg(), &loosened);
        assert!(!d.is_empty() && !d.has_immutable());
    }

    #[test]
    fn consumer_start_change_is_immutable_and_ack_wait_is_not() {
        let desired = consumer::pull::Config {
            durable_name: Some("c".into()),
            ack_wait: Duration::from_secs(30),
            filter_subjects: vec!["a.b".into()],
            ..Default::default()
        };
        let mut actual = desired.clone().into_consumer_config();
        actual.filter_subjects = Vec::new();
        actual.filter_subject = "a.b".into();
        assert!(
            diff_consumer(&desired, &actual).is_empty(),
            "one filter may come back as filter_subject"
        );

        actual.ack_wait = Duration::from_secs(10);
        actual.deliver_policy = DeliverPolicy::New;
        let d = diff_consumer(&desired, &actual);
        let fields: Vec<_> = d.changes.iter().map(|c| (c.field, c.mutability)).collect();
        assert_eq!(
            fields,
            vec![
                ("deliver_policy", Mutability::Immutable),
                ("ack_wait", Mutability::InPlace)
            ]
        );
    }

    #[test]
    fn a_consumer_with_explicit_acks_is_kept_as_it_is() {
        let desired = consumer::pull::Config {
            durable_name: Some("c".into()),
            ack_policy: consumer::AckPolicy::All,
            ..Default::default()
        };
        let mut actual = desired.clone().into_consumer_config();
        actual.ack_policy = consumer::AckPolicy::Explicit;
        assert!(diff_consumer(&desired, &actual).is_empty());
        actual.ack_policy = consumer::AckPolicy::None;
        assert!(diff_consumer(&desired, &actual).has_immutable());
    }
}
