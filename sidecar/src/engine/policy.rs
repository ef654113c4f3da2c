//! The policy step: what becomes of an event that cannot be applied — try it again, record it as a dead letter, skip
//! it with a record, or halt the projection — decided from the projection's `onError` and what the failure is.
//! Pure: the apply step asks, then acts.

use std::time::Duration;

use projectionist_crds::projection::ErrorPolicy;
use projectionist_crds::sidecar_config::OnErrorConfig;

/// Exponential backoff between `initial` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The next delay (doubling, capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Why an event failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The message is not a usable event: the same every time.
    Decode(String),
    /// A handler's parameter cannot be bound from the event (a missing field, a wrong shape): the same every time.
    Bind(String),
    /// The database refused a statement for this event (a constraint, a type, a value out of range). It may depend
    /// on the read model's state, so it is tried again up to `maxAttempts`.
    Database(String),
}

impl Fault {
    /// The error kind in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Decode(_) => "decode",
            Self::Bind(_) => "bind",
            Self::Database(_) => "database_permanent",
        }
    }

    /// What went wrong, for the dead letter and the log.
    pub fn message(&self) -> String {
        match self {
            Self::Decode(m) => format!("undecodable: {m}"),
            Self::Bind(m) => m.clone(),
            Self::Database(m) => format!("database: {m}"),
        }
    }

    fn deterministic(&self) -> bool {
        !matches!(self, Self::Database(_))
    }
}

/// What to do next with a failing event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try it again after the delay.
    Retry(Duration),
    /// Record it (dead letter or skip) and carry on with the next event.
    Record(ErrorPolicy),
    /// Stop the projection before it.
    Halt,
}

/// A projection's `onError`.
#[derive(Debug, Clone)]
pub struct Policy {
    policy: ErrorPolicy,
    max_attempts: u32,
    initial: Duration,
    max: Duration,
}

impl Policy {
    /// From the sidecar config.
    pub fn new(config: &OnErrorConfig) -> Self {
        Self {
            policy: config.policy,
            max_attempts: config.max_attempts.max(1),
            initial: config.backoff_initial,
            max: config.backoff_max,
        }
    }

    /// The configured policy.
    pub fn policy(&self) -> ErrorPolicy {
        self.policy
    }

    /// After `attempts` tries (1 or more) that failed with `fault`.
    pub fn decide(&self, fault: &Fault, attempts: u32) -> Decision {
        if !fault.deterministic() && attempts < self.max_attempts {
            let mut backoff = Backoff::new(self.initial, self.max);
            let mut delay = backoff.next_delay();
            for _ in 1..attempts {
                delay = backoff.next_delay();
            }
            return Decision::Retry(delay);
        }
        match self.policy {
            ErrorPolicy::Halt => Decision::Halt,
            other => Decision::Record(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(policy: ErrorPolicy, max_attempts: u32) -> Policy {
        Policy {
            policy,
            max_attempts,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(300),
        }
    }

    #[test]
    fn deterministic_faults_meet_the_policy_at_once() {
        let p = policy(ErrorPolicy::DeadLetter, 5);
        assert_eq!(
            p.decide(&Fault::Decode("not JSON".into()), 1),
            Decision::Record(ErrorPolicy::DeadLetter)
        );
        assert_eq!(
            policy(ErrorPolicy::Halt, 5).decide(&Fault::Bind("missing :data.n".into()), 1),
            Decision::Halt
        );
        assert_eq!(
            policy(ErrorPolicy::Skip, 5).decide(&Fault::Bind("x".into()), 1),
            Decision::Record(ErrorPolicy::Skip)
        );
    }

    #[test]
    fn database_faults_are_retried_with_backoff_up_to_max_attempts() {
        let p = policy(ErrorPolicy::Skip, 4);
        let fault = Fault::Database("23505".into());
        assert_eq!(
            p.decide(&fault, 1),
            Decision::Retry(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(&fault, 2),
            Decision::Retry(Duration::from_millis(200))
        );
        assert_eq!(
            p.decide(&fault, 3),
            Decision::Retry(Duration::from_millis(300))
        );
        assert_eq!(p.decide(&fault, 4), Decision::Record(ErrorPolicy::Skip));
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let p = policy(ErrorPolicy::Halt, 0);
        assert_eq!(p.decide(&Fault::Database("x".into()), 1), Decision::Halt);
    }

    #[test]
    fn backoff_doubles_and_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3));
        let delays: Vec<u64> = (0..4).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 3, 3]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }
}
