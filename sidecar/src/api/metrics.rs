//! The event-store API's metrics, `projectionist_sidecar_api_*`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// HTTP method (`other` for one the API does not serve).
    pub method: &'static str,
    /// Route template, e.g. `/v1/stores/{store}/aggregates/{type}/{id}/events` (`unmatched` for none).
    pub route: &'static str,
    /// HTTP status code.
    pub status: u16,
}

/// Label of per-store series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    /// The EventStore's name.
    pub store: String,
}

type HistogramFamily = Family<StoreLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The API's series.
#[derive(Debug)]
pub struct ApiMetrics {
    /// Requests by method, route and status.
    pub requests: Family<RequestLabel, Counter>,
    /// Time from receiving an append to the server's acknowledgement.
    pub append_duration: HistogramFamily,
    /// Appends refused because the expected version did not match.
    pub conflicts: Family<StoreLabel, Counter>,
    /// Appends recognised as retries of earlier ones.
    pub duplicates: Family<StoreLabel, Counter>,
}

impl ApiMetrics {
    /// Registers every series.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            requests: Family::default(),
            append_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            conflicts: Family::default(),
            duplicates: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("projectionist_sidecar_api");
        r.register(
            "requests",
            "Event-store API requests by method, route and status",
            m.requests.clone(),
        );
        r.register(
            "append_duration_seconds",
            "Time to append events, until the server acknowledged them",
            m.append_duration.clone(),
        );
        r.register(
            "conflicts",
            "Appends refused because the aggregate was not at the expected version",
            m.conflicts.clone(),
        );
        r.register(
            "duplicates",
            "Appends recognised as retries of earlier appends (answered with the original sequences)",
            m.duplicates.clone(),
        );
        Arc::new(m)
    }

    /// Counts a request.
    pub fn request(&self, method: &'static str, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabel {
                method,
                route,
                status,
            })
            .inc();
    }

    /// Records an append's outcome for `store`.
    pub fn append(&self, store: &str, took: Duration, conflict: bool, duplicate: bool) {
        let label = StoreLabel {
            store: store.to_string(),
        };
        self.append_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if conflict {
            self.conflicts.get_or_create(&label).inc();
        }
        if duplicate {
            self.duplicates.get_or_create(&label).inc();
        }
    }
}
