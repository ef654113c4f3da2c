//! Partitioned EventStores: the subject layout and the hash, computed the way the server computes them.
//!
//! Publishers keep publishing `<prefix>.<type>.<id>`. A partitioned store's stream captures exactly that form
//! (`<prefix>.*.*`; any other subject finds no stream and is refused) and stores each event, by a JetStream subject
//! transform, under `<prefix>.<partition>.<type>.<id>`, where
//!
//! ```text
//! partition = FNV-1a-32(type ++ id) mod partitions        (the two tokens' bytes, concatenated, no separator)
//! ```
//!
//! — the server's `{{partition(N,1,2)}}` function. All events of an aggregate therefore share one partition, and a
//! client that needs the stored subject (to read an aggregate, to filter one partition) computes it with
//! [`partition_of`].

/// The most partitions a store may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// 32-bit FNV-1a, as the server's partition function uses it.
pub fn fnv1a32(bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition of aggregate `(kind, id)` in a store of `partitions` partitions.
pub fn partition_of(kind: &str, id: &str, partitions: u32) -> u32 {
    fnv1a32(kind.bytes().chain(id.bytes())) % partitions.max(1)
}

/// The subject layout of one partitioned store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The subject prefix (the store's subject without `.>`).
    pub prefix: String,
    /// How many partitions.
    pub partitions: u32,
}

impl Layout {
    /// The layout of a store whose subject prefix is `prefix`.
    pub fn new(prefix: &str, partitions: u32) -> Self {
        Self {
            prefix: prefix.to_string(),
            partitions,
        }
    }

    /// What the stream captures: `<prefix>.*.*`.
    pub fn captured(&self) -> String {
        format!("{}.*.*", self.prefix)
    }

    /// The server's transform destination: `<prefix>.{{partition(N,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}`.
    pub fn destination(&self) -> String {
        format!(
            "{}.{{{{partition({},1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
            self.prefix, self.partitions
        )
    }

    /// Where the server stores aggregate `(kind, id)`.
    pub fn stored(&self, kind: &str, id: &str) -> String {
        format!(
            "{}.{}.{kind}.{id}",
            self.prefix,
            partition_of(kind, id, self.partitions)
        )
    }

    /// A filter written against the publishers' form (`<prefix>.<rest>`), on the stored form of every partition
    /// (`Some(p)`: of partition `p` only). `None` for a filter that does not start with the prefix.
    pub fn stored_filter(&self, filter: &str, partition: Option<u32>) -> Option<String> {
        let rest = filter.strip_prefix(&self.prefix)?;
        let token = partition.map_or_else(|| "*".to_string(), |p| p.to_string());
        if rest.is_empty() {
            return None;
        }
        let rest = rest.strip_prefix('.')?;
        Some(format!("{}.{token}.{rest}", self.prefix))
    }

    /// The stored subjects partition `p` holds of a projection's `filters` (publishers' form; empty: all).
    pub fn partition_filters(&self, filters: &[String], p: u32) -> Vec<String> {
        if filters.is_empty() {
            return vec![format!("{}.{p}.>", self.prefix)];
        }
        filters
            .iter()
            .filter_map(|f| self.stored_filter(f, Some(p)))
            .collect()
    }

    /// The partition token and the rest (`<type>.<id>`) of a stored subject.
    fn split<'a>(&self, stored: &'a str) -> Option<(u32, &'a str)> {
        let rest = stored.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (partition, aggregate) = rest.split_once('.')?;
        Some((partition.parse().ok()?, aggregate))
    }

    /// The subject after the prefix with the partition token removed: `<type>.<id>` of a stored subject.
    pub fn aggregate_of<'a>(&self, stored: &'a str) -> Option<&'a str> {
        self.split(stored).map(|(_, aggregate)| aggregate)
    }

    /// The partition a stored subject is in.
    pub fn partition_in(&self, stored: &str) -> Option<u32> {
        self.split(stored).map(|(partition, _)| partition)
    }
}

/// The partitions of a stream, read back from its subject transform's destination (`…{{partition(N,1,2)}}…`).
pub fn partitions_of(destination: &str) -> Option<u32> {
    let rest = &destination[destination.find("{{partition(")? + "{{partition(".len()..];
    rest[..rest.find(',')?].trim().parse().ok()
}

/// The stream the replicas of partitioned projections report their share and lag on, one message per replica
/// (the last kept, gone a minute after the replica stopped reporting); the operator reads it for status.
pub const PROGRESS_STREAM: &str = "PROJECTIONIST_PROGRESS";

/// The subject of replica `member`'s report for projection `namespace/name`.
pub fn progress_subject(namespace: &str, name: &str, member: &str) -> String {
    format!("projectionist.progress.{namespace}.{name}.{member}")
}

/// The subjects of every replica's report for projection `namespace/name`.
pub fn progress_filter(namespace: &str, name: &str) -> String {
    format!("projectionist.progress.{namespace}.{name}.*")
}

/// The stream of the reports.
pub fn progress_stream() -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: PROGRESS_STREAM.to_string(),
        description: Some(
            "Partitioned projections' replicas: their partitions and lag (projectionist)".into(),
        ),
        subjects: vec!["projectionist.progress.>".into()],
        max_messages_per_subject: 1,
        max_age: std::time::Duration::from_secs(60),
        storage: async_nats::jetstream::stream::StorageType::Memory,
        allow_direct: true,
        ..Default::default()
    }
}

/// One replica's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// The partitions it owns.
    pub partitions: Vec<u32>,
    /// Events of its partitions not yet applied (the largest of its workers').
    pub lag: u64,
}

/// How the partitions are spread (replica → partitions owned) and the largest lag, from the replicas' reports.
pub fn spread(reports: &[(String, Progress)]) -> (std::collections::BTreeMap<String, u32>, u64) {
    let spread = reports
        .iter()
        .map(|(member, p)| {
            (
                member.clone(),
                u32::try_from(p.partitions.len()).unwrap_or(u32::MAX),
            )
        })
        .collect();
    let lag = reports.iter().map(|(_, p)| p.lag).max().unwrap_or_default();
    (spread, lag)
}

/// The partitions of `total` a member of rank `rank` among `members` live members should own: a fair share,
/// the first `total % members` members owning one more.
pub fn quota(total: u32, members: usize, rank: usize) -> u32 {
    let members = u32::try_from(members.max(1)).unwrap_or(u32::MAX);
    let rank = u32::try_from(rank).unwrap_or(u32::MAX);
    total / members + u32::from(rank < total % members)
}

/// The partitions of `total` that the member of rank `rank` among `members` live members (sorted by name) is
/// assigned when every member computes the assignment from the same list: contiguous ranges of [`quota`] size.
pub fn assigned(total: u32, members: usize, rank: usize) -> std::ops::Range<u32> {
    if rank >= members {
        return 0..0;
    }
    let start: u32 = (0..rank).map(|r| quota(total, members, r)).sum();
    start..start + quota(total, members, rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_cover_every_partition_once_in_fair_shares() {
        for total in [1, 7, 16, 50] {
            for members in 1..=6 {
                let mut seen = Vec::new();
                for rank in 0..members {
                    let mine = assigned(total, members, rank);
                    assert!(mine.len() as u32 <= total / members as u32 + 1);
                    assert!(mine.len() as u32 >= total / members as u32);
                    seen.extend(mine);
                }
                assert_eq!(seen, (0..total).collect::<Vec<_>>());
            }
        }
        assert_eq!(assigned(4, 2, 2), 0..0);
    }

    #[test]
    fn fnv1a32_matches_the_reference_vectors() {
        assert_eq!(fnv1a32(*b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(*b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(*b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn an_aggregate_has_one_partition_and_partitions_spread() {
        let layout = Layout::new("ns.users", 50);
        assert_eq!(layout.stored("user", "42"), layout.stored("user", "42"));
        let used: std::collections::BTreeSet<u32> = (0..5000)
            .map(|i| partition_of("user", &i.to_string(), 50))
            .collect();
        assert_eq!(used.len(), 50);
        assert!(used.iter().all(|p| *p < 50));
    }

    #[test]
    fn the_transform_and_filters_follow_the_layout() {
        let layout = Layout::new("ns.users", 8);
        assert_eq!(layout.captured(), "ns.users.*.*");
        assert_eq!(
            layout.destination(),
            "ns.users.{{partition(8,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}"
        );
        assert_eq!(
            layout.stored_filter("ns.users.user.>", None).as_deref(),
            Some("ns.users.*.user.>")
        );
        assert_eq!(
            layout.stored_filter("ns.users.>", Some(3)).as_deref(),
            Some("ns.users.3.>")
        );
        assert_eq!(layout.stored_filter("other.>", None), None);
        assert_eq!(layout.partition_filters(&[], 2), vec!["ns.users.2.>"]);
        assert_eq!(
            layout.partition_filters(&["ns.users.user.>".into()], 2),
            vec!["ns.users.2.user.>"]
        );
        assert_eq!(layout.stored_filter("ns.usersx.>", None), None);
        assert_eq!(partitions_of(&layout.destination()), Some(8));
        assert_eq!(partitions_of("ns.users.{{wildcard(1)}}"), None);
        assert_eq!(layout.aggregate_of("ns.users.3.user.42"), Some("user.42"));
        assert_eq!(layout.aggregate_of("ns.users.user.42"), None);
        assert_eq!(layout.partition_in("ns.users.3.user.42"), Some(3));
        assert_eq!(layout.partition_in("ns.users.user.42"), None);
    }

    #[test]
    fn reports_give_the_spread_and_the_largest_lag() {
        let reports = vec![
            (
                "a".to_string(),
                Progress {
                    partitions: vec![0, 1],
                    lag: 5,
                },
            ),
            (
                "b".to_string(),
                Progress {
                    partitions: vec![2],
                    lag: 9,
                },
            ),
        ];
        let (spread, lag) = spread(&reports);
        assert_eq!(spread, [("a".to_string(), 2), ("b".to_string(), 1)].into());
        assert_eq!(lag, 9);
        assert_eq!(
            progress_subject("ns", "p", "pod-1"),
            "projectionist.progress.ns.p.pod-1"
        );
    }

    #[test]
    fn quotas_are_fair_and_add_up() {
        for total in [1, 7, 50, 1024] {
            for members in 1..=7 {
                let shares: Vec<u32> = (0..members).map(|r| quota(total, members, r)).collect();
                assert_eq!(shares.iter().sum::<u32>(), total);
                let (min, max) = (
                    shares.iter().min().expect("min"),
                    shares.iter().max().expect("max"),
                );
                assert!(max - min <= 1, "{shares:?}");
            }
        }
    }
}
