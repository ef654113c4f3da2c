//! What reactors report to Prometheus: `projectionist_sidecar_reactor_*`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of per-reactor series: `<namespace>/<name>`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReactorLabel {
    /// The reactor.
    pub reactor: String,
}

/// Label of failed calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// The reactor.
    pub reactor: String,
    /// `transient` (retried) or `permanent`.
    pub class: String,
}

type CallHistogram = Family<ReactorLabel, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// Every reactor's series.
#[derive(Debug)]
pub struct ReactorMetrics {
    /// Events delivered (the endpoint answered 2xx).
    pub delivered: Family<ReactorLabel, Counter>,
    /// Events the server delivered to the sidecar again (a sidecar died, progress was not reported in time).
    pub redelivered: Family<ReactorLabel, Counter>,
    /// Calls that failed, by class.
    pub failures: Family<FailureLabel, Counter>,
    /// Duration of calls to the endpoint.
    pub call_duration: CallHistogram,
    /// Events moved to the parking lot.
    pub parked: Family<ReactorLabel, Counter>,
    /// Aggregates in the parking lot.
    pub parked_aggregates: Family<ReactorLabel, Gauge>,
    /// Events published to the dead-letter subject (policy `deadLetter`, or skipped from the parking lot).
    pub dead_letters: Family<ReactorLabel, Counter>,
    /// Events appended from endpoints' answers.
    pub emitted: Family<ReactorLabel, Counter>,
    /// Aggregates with a delivery in flight.
    pub in_flight: Family<ReactorLabel, Gauge>,
    /// 1 when the reactor stopped under `halt`.
    pub halted: Family<ReactorLabel, Gauge>,
}

impl ReactorMetrics {
    /// Registers every series.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            delivered: Family::default(),
            redelivered: Family::default(),
            failures: Family::default(),
            call_duration: Family::new_with_constructor(call_histogram as fn() -> Histogram),
            parked: Family::default(),
            parked_aggregates: Family::default(),
            dead_letters: Family::default(),
            emitted: Family::default(),
            in_flight: Family::default(),
            halted: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("projectionist_sidecar_reactor");
        r.register(
            "delivered",
            "Events delivered to the endpoint",
            m.delivered.clone(),
        );
        r.register(
            "redelivered",
            "Events the server delivered to the sidecar again",
            m.redelivered.clone(),
        );
        r.register("call_failures", "Failed calls by class", m.failures.clone());
        r.register(
            "call_duration_seconds",
            "Duration of calls to the endpoint",
            m.call_duration.clone(),
        );
        r.register(
            "parked",
            "Events moved to the parking lot",
            m.parked.clone(),
        );
        r.register(
            "parked_aggregates",
            "Aggregates in the parking lot",
            m.parked_aggregates.clone(),
        );
        r.register(
            "dead_letters",
            "Events published to the dead-letter subject",
            m.dead_letters.clone(),
        );
        r.register("emitted", "Events appended from answers", m.emitted.clone());
        r.register(
            "in_flight",
            "Aggregates with a delivery in flight",
            m.in_flight.clone(),
        );
        r.register("halted", "1 when stopped under halt", m.halted.clone());
        Arc::new(m)
    }

    fn label(reactor: &str) -> ReactorLabel {
        ReactorLabel {
            reactor: reactor.to_string(),
        }
    }

    /// One call took `took`; `failure` is its class when it failed.
    pub fn call(&self, reactor: &str, took: Duration, failure: Option<&str>) {
        self.call_duration
            .get_or_create(&Self::label(reactor))
            .observe(took.as_secs_f64());
        match failure {
            None => {
                self.delivered.get_or_create(&Self::label(reactor)).inc();
            }
            Some(class) => {
                self.failures
                    .get_or_create(&FailureLabel {
                        reactor: reactor.to_string(),
                        class: class.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// A counter of this reactor.
    pub fn count(family: &Family<ReactorLabel, Counter>, reactor: &str, n: u64) {
        family.get_or_create(&Self::label(reactor)).inc_by(n);
    }

    /// A gauge of this reactor.
    pub fn set(family: &Family<ReactorLabel, Gauge>, reactor: &str, value: i64) {
        family.get_or_create(&Self::label(reactor)).set(value);
    }
}
