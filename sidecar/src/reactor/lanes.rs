//! Per-aggregate lanes: the pure scheduling of a reactor. Each aggregate's events wait in a lane of their own, in
//! stream order (by sequence, whatever order they arrived in: a redelivered earlier event goes before a later one);
//! a lane is *busy* while one job of it runs (a delivery, or a retry of its parked events), and at most
//! `concurrency` lanes are busy at once. Lanes with work and no job wait their turn in arrival order. A *fenced* lane
//! starts nothing until it is unfenced (its aggregate may still have an earlier event coming back from the server).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

/// The lanes of one reactor. Items are stream sequences; the messages themselves are kept by the caller.
#[derive(Debug)]
pub struct Lanes {
    lanes: HashMap<String, Lane>,
    ready: VecDeque<String>,
    busy: usize,
    concurrency: usize,
    fenced: HashSet<String>,
}

#[derive(Debug, Default)]
struct Lane {
    queue: BTreeSet<u64>,
    busy: bool,
    /// The job holds one of the `concurrency` slots (a finished call waiting for its acknowledgement does not).
    slot: bool,
    waiting: bool,
}

impl Lanes {
    /// Lanes with at most `concurrency` busy at once.
    pub fn new(concurrency: usize) -> Self {
        Self {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            busy: 0,
            concurrency: concurrency.max(1),
            fenced: HashSet::new(),
        }
    }

    /// Queues `seq` in sequence order among the aggregate's events.
    pub fn push(&mut self, aggregate: &str, seq: u64) {
        let lane = self.lanes.entry(aggregate.to_string()).or_default();
        lane.queue.insert(seq);
        if !lane.busy && !lane.waiting && !self.fenced.contains(aggregate) {
            lane.waiting = true;
            self.ready.push_back(aggregate.to_string());
        }
    }

    /// Holds the aggregate's events until [`Lanes::unfence`].
    pub fn fence(&mut self, aggregate: &str) {
        self.fenced.insert(aggregate.to_string());
    }

    /// Lets a fenced aggregate's events go.
    pub fn unfence(&mut self, aggregate: &str) {
        if !self.fenced.remove(aggregate) {
            return;
        }
        if let Some(lane) = self.lanes.get_mut(aggregate)
            && !lane.busy
            && !lane.waiting
            && !lane.queue.is_empty()
        {
            lane.waiting = true;
            self.ready.push_back(aggregate.to_string());
        }
    }

    /// Lets every fenced aggregate go.
    pub fn unfence_all(&mut self) {
        let fenced: Vec<String> = self.fenced.iter().cloned().collect();
        for aggregate in fenced {
            self.unfence(&aggregate);
        }
    }

    /// The next event to deliver, if a lane may start: the head of the longest-waiting lane. Its lane is busy until
    /// [`Lanes::done`].
    pub fn next_job(&mut self) -> Option<(String, u64)> {
        while self.busy < self.concurrency {
            let aggregate = self.ready.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&aggregate) else {
                continue;
            };
            lane.waiting = false;
            if lane.busy || self.fenced.contains(&aggregate) {
                continue;
            }
            let Some(seq) = lane.queue.pop_first() else {
                continue;
            };
            lane.busy = true;
            lane.slot = true;
            self.busy += 1;
            return Some((aggregate, seq));
        }
        None
    }

    /// Marks the aggregate's lane busy with a job that is not one of its queued events (a retry of its parked
    /// events). `false` when the lane is busy already.
    pub fn occupy(&mut self, aggregate: &str) -> bool {
        let lane = self.lanes.entry(aggregate.to_string()).or_default();
        if lane.busy {
            return false;
        }
        lane.busy = true;
        lane.slot = true;
        self.busy += 1;
        true
    }

    /// The aggregate's job no longer needs a slot (its call is over; it waits for the acknowledgement), while its
    /// lane stays busy until [`Lanes::done`].
    pub fn release(&mut self, aggregate: &str) {
        if let Some(lane) = self.lanes.get_mut(aggregate)
            && lane.slot
        {
            lane.slot = false;
            self.busy -= 1;
        }
    }

    /// Whether the aggregate's lane runs a job.
    pub fn is_busy(&self, aggregate: &str) -> bool {
        self.lanes.get(aggregate).is_some_and(|l| l.busy)
    }

    /// The aggregate's job finished: its lane is free for its next event.
    pub fn done(&mut self, aggregate: &str) {
        let Some(lane) = self.lanes.get_mut(aggregate) else {
            return;
        };
        if lane.slot {
            self.busy -= 1;
        }
        lane.busy = false;
        lane.slot = false;
        if lane.queue.is_empty() {
            self.lanes.remove(aggregate);
        } else if !lane.waiting && !self.fenced.contains(aggregate) {
            lane.waiting = true;
            self.ready.push_back(aggregate.to_string());
        }
    }

    /// Takes every queued event of the aggregate, in order (to park them behind a failed one).
    pub fn take_queue(&mut self, aggregate: &str) -> Vec<u64> {
        self.lanes
            .get_mut(aggregate)
            .map(|l| std::mem::take(&mut l.queue).into_iter().collect())
            .unwrap_or_default()
    }

    /// Jobs holding a slot.
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// Events queued in all lanes.
    pub fn queued(&self) -> usize {
        self.lanes.values().map(|l| l.queue.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_aggregate_at_a_time_in_order() {
        let mut lanes = Lanes::new(8);
        lanes.push("a", 1);
        lanes.push("a", 2);
        lanes.push("b", 3);
        assert_eq!(lanes.next_job(), Some(("a".into(), 1)));
        assert_eq!(lanes.next_job(), Some(("b".into(), 3)));
        assert_eq!(
            lanes.next_job(),
            None,
            "a's second event waits for its first"
        );
        lanes.done("a");
        assert_eq!(lanes.next_job(), Some(("a".into(), 2)));
        lanes.done("a");
        lanes.done("b");
        assert_eq!(lanes.next_job(), None);
        assert_eq!(lanes.busy(), 0);
        assert_eq!(lanes.queued(), 0);
    }

    #[test]
    fn a_late_earlier_event_goes_first_and_fenced_lanes_wait() {
        let mut lanes = Lanes::new(4);
        lanes.fence("a");
        lanes.push("a", 9);
        lanes.push("b", 3);
        assert_eq!(lanes.next_job(), Some(("b".into(), 3)));
        assert_eq!(lanes.next_job(), None, "a is fenced");
        lanes.push("a", 4);
        lanes.unfence("a");
        assert_eq!(
            lanes.next_job(),
            Some(("a".into(), 4)),
            "the earlier event first"
        );
        lanes.done("a");
        assert_eq!(lanes.next_job(), Some(("a".into(), 9)));
        lanes.fence("c");
        lanes.push("c", 10);
        lanes.unfence_all();
        assert_eq!(lanes.next_job(), Some(("c".into(), 10)));
    }

    #[test]
    fn a_released_job_frees_its_slot_but_not_its_lane() {
        let mut lanes = Lanes::new(1);
        lanes.push("a", 1);
        lanes.push("a", 2);
        lanes.push("b", 3);
        assert_eq!(lanes.next_job(), Some(("a".into(), 1)));
        assert_eq!(lanes.next_job(), None);
        lanes.release("a");
        assert_eq!(
            lanes.next_job(),
            Some(("b".into(), 3)),
            "the slot went to another aggregate"
        );
        assert!(lanes.is_busy("a"));
        lanes.done("a");
        assert_eq!(lanes.next_job(), None, "b holds the only slot");
        lanes.done("b");
        assert_eq!(lanes.next_job(), Some(("a".into(), 2)));
    }

    #[test]
    fn concurrency_bounds_busy_lanes_and_waiting_lanes_go_in_arrival_order() {
        let mut lanes = Lanes::new(2);
        for (i, a) in ["a", "b", "c", "d"].iter().enumerate() {
            lanes.push(a, i as u64 + 1);
        }
        assert_eq!(lanes.next_job(), Some(("a".into(), 1)));
        assert_eq!(lanes.next_job(), Some(("b".into(), 2)));
        assert_eq!(lanes.next_job(), None);
        lanes.done("b");
        assert_eq!(lanes.next_job(), Some(("c".into(), 3)));
        lanes.done("a");
        assert_eq!(lanes.next_job(), Some(("d".into(), 4)));
    }

    #[test]
    fn an_occupied_lane_holds_its_events_and_failed_lanes_hand_over_their_queue() {
        let mut lanes = Lanes::new(4);
        assert!(lanes.occupy("a"));
        assert!(!lanes.occupy("a"));
        lanes.push("a", 5);
        lanes.push("a", 6);
        assert_eq!(lanes.next_job(), None);
        assert!(lanes.is_busy("a"));
        assert_eq!(lanes.take_queue("a"), vec![5, 6]);
        lanes.done("a");
        assert!(!lanes.is_busy("a"));
        assert_eq!(lanes.next_job(), None);
        assert_eq!(lanes.busy(), 0);
    }
}
