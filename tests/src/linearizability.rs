//! A linearizability checker for Quiver's per-key registers, in the style of
//! Wing & Gong with Lowe's memoization (the algorithm behind Porcupine and
//! Knossos), and an acknowledged-write ledger.
//!
//! The model: a key holds the row with the newest event time written so far
//! (last write wins by event time; equal event times: the later write wins,
//! but the histories here never reuse an event time). A write `(ts, value)`
//! makes the state `max(state, (ts, value))`; a read returns the state, or
//! nothing if no write took effect. Event times are unique, but need not
//! follow invocation order (the nemesis mixes in backfill writes older than
//! everything before them).
//!
//! A history is the list of operations with their invocation and completion
//! times; an operation that never completed (a timeout, a crash) may have
//! taken effect at any time after its invocation, or never: it is given an
//! infinite completion time and may be linearized nowhere (for writes) or
//! dropped (for reads, which change nothing). Keys are independent
//! (linearizability is compositional), so each key is checked alone.

use std::collections::{BTreeMap, HashSet};

/// One operation on one key, as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The key.
    pub key: String,
    /// When the client sent it (any monotonic clock, same for every client).
    pub invoked: u64,
    /// When the client got the answer; `None`: it never did (it may or may
    /// not have taken effect).
    pub completed: Option<u64>,
    /// What it did.
    pub kind: Kind,
}

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Wrote `value` at event time `ts`.
    Write {
        /// Event time.
        ts: i64,
        /// Value.
        value: i64,
    },
    /// Read `value` (the event time and value stored), `None` for no row.
    Read {
        /// What was read.
        value: Option<(i64, i64)>,
    },
}

/// A key whose history has no linearization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// Its operations, in invocation order.
    pub operations: Vec<Operation>,
}

/// Checks every key of `history`; the keys that are not linearizable.
pub fn check(history: &[Operation]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in history {
        // A read that never completed says nothing.
        if operation.completed.is_none() && matches!(operation.kind, Kind::Read { .. }) {
            continue;
        }
        by_key.entry(&operation.key).or_default().push(operation);
    }
    by_key
        .into_iter()
        .filter_map(|(key, mut operations)| {
            operations.sort_by_key(|op| op.invoked);
            (!linearizable(&operations)).then(|| Violation {
                key: key.to_owned(),
                operations: operations.into_iter().cloned().collect(),
            })
        })
        .collect()
}

/// The register's state: the newest (event time, value) written, if any.
type State = Option<(i64, i64)>;

/// Whether the operations of one key have a linearization: an order that
/// respects real time (an operation completed before another was invoked
/// comes first) and in which every completed read returns the state. An
/// uncompleted write may also be left out. Depth-first search over which
/// pending operation goes next, memoizing (set of done operations, state)
/// pairs already explored.
fn linearizable(operations: &[&Operation]) -> bool {
    let n = operations.len();
    let end = |op: &Operation| op.completed.unwrap_or(u64::MAX);
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut done = vec![false; n];
    fn search(
        operations: &[&Operation],
        done: &mut Vec<bool>,
        state: State,
        seen: &mut HashSet<(Vec<u64>, State)>,
        end: &dyn Fn(&Operation) -> u64,
    ) -> bool {
        let n = operations.len();
        // Finished when every completed operation is placed (uncompleted
        // writes may never have happened).
        if (0..n).all(|i| done[i] || operations[i].completed.is_none()) {
            return true;
        }
        let key = (bitset(done), state);
        if !seen.insert(key) {
            return false;
        }
        // The earliest completion among the operations not yet placed: any
        // operation invoked after it cannot go next.
        let horizon = (0..n)
            .filter(|&i| !done[i])
            .map(|i| end(operations[i]))
            .min()
            .unwrap_or(u64::MAX);
        // A write older than the state changes nothing wherever it goes
        // (the state's event time only grows): place it now if it may go
        // next, without branching. An uncompleted one may be left out
        // entirely. Without this, every write lost in a crash doubles the
        // search.
        let current_ts = state.map(|(ts, _)| ts);
        let no_op: Vec<usize> = (0..n)
            .filter(|&i| !done[i])
            .filter(|&i| match operations[i].kind {
                Kind::Write { ts, .. } => current_ts.is_some_and(|current| ts < current),
                Kind::Read { .. } => false,
            })
            .filter(|&i| operations[i].completed.is_none() || operations[i].invoked <= horizon)
            .collect();
        if !no_op.is_empty() {
            for &i in &no_op {
                done[i] = true;
            }
            if search(operations, done, state, seen, end) {
                return true;
            }
            for &i in &no_op {
                done[i] = false;
            }
            return false;
        }
        for i in 0..n {
            if done[i] || operations[i].invoked > horizon {
                continue;
            }
            let next = match operations[i].kind {
                Kind::Write { ts, value } => Some(match state {
                    Some((current, _)) if current > ts => state,
                    _ => Some((ts, value)),
                }),
                Kind::Read { value } => (value == state).then_some(state),
            };
            if let Some(next) = next {
                done[i] = true;
                if search(operations, done, next, seen, end) {
                    return true;
                }
                done[i] = false;
            }
        }
        false
    }
    search(operations, &mut done, None, &mut seen, &end)
}

fn bitset(done: &[bool]) -> Vec<u64> {
    let mut words = vec![0u64; done.len().div_ceil(64)];
    for (i, &d) in done.iter().enumerate() {
        if d {
            words[i / 64] |= 1 << (i % 64);
        }
    }
    words
}

/// Every write a client saw acknowledged, to check against what the
/// cluster holds at the end: nothing acknowledged may be lost (a read may
/// return a later write of the same key instead).
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    acknowledged: BTreeMap<String, (i64, i64)>,
}

impl Ledger {
    /// Records an acknowledged write (keeps the newest per key).
    pub fn acknowledge(&mut self, key: &str, ts: i64, value: i64) {
        let entry = self
            .acknowledged
            .entry(key.to_owned())
            .or_insert((ts, value));
        if ts >= entry.0 {
            *entry = (ts, value);
        }
    }

    /// The keys with an acknowledged write.
    pub fn keys(&self) -> Vec<String> {
        self.acknowledged.keys().cloned().collect()
    }

    /// The acknowledged writes `read` does not hold (nothing, or something
    /// older): `(key, acknowledged, read)`.
    #[allow(clippy::type_complexity)]
    pub fn lost(
        &self,
        read: &BTreeMap<String, Option<(i64, i64)>>,
    ) -> Vec<(String, (i64, i64), Option<(i64, i64)>)> {
        self.acknowledged
            .iter()
            .filter_map(|(key, &acked)| {
                let found = read.get(key).copied().flatten();
                match found {
                    Some((ts, _)) if ts >= acked.0 => None,
                    _ => Some((key.clone(), acked, found)),
                }
            })
            .collect()
    }
}

/// A bounded-staleness read that broke its bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRead {
    /// The read.
    pub read: Operation,
    /// Why: what it should at least have seen, or that what it saw was
    /// never written (or not yet invoked when the read completed).
    pub reason: String,
}

/// Checks reads that promise bounded staleness (not linearizability): a
/// read invoked at `t` must hold every write acknowledged before
/// `t - bound_us` (that write or a newer one: values are ordered by event
/// time), and may only return a value some write of its key had been
/// invoked with by the time the read completed.
pub fn stale_reads(history: &[Operation], reads: &[Operation], bound_us: u64) -> Vec<StaleRead> {
    let mut writes: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        if matches!(op.kind, Kind::Write { .. }) {
            writes.entry(op.key.as_str()).or_default().push(op);
        }
    }
    let mut violations = Vec::new();
    for read in reads {
        let Kind::Read { value } = read.kind else {
            continue;
        };
        let Some(completed) = read.completed else {
            continue;
        };
        let key_writes = writes.get(read.key.as_str()).map_or(&[][..], Vec::as_slice);
        let required = key_writes
            .iter()
            .filter(|w| {
                w.completed
                    .is_some_and(|c| c.saturating_add(bound_us) < read.invoked)
            })
            .filter_map(|w| match w.kind {
                Kind::Write { ts, .. } => Some(ts),
                Kind::Read { .. } => None,
            })
            .max();
        let seen = value.map(|(ts, _)| ts);
        if let Some(required) = required
            && seen.is_none_or(|ts| ts < required)
        {
            violations.push(StaleRead {
                read: read.clone(),
                reason: format!(
                    "saw {seen:?}, but the write at {required} was acknowledged more than {bound_us} µs before the read began"
                ),
            });
            continue;
        }
        if let Some((ts, v)) = value {
            let written = key_writes.iter().any(|w| {
                w.invoked <= completed
                    && matches!(w.kind, Kind::Write { ts: wts, value: wv } if wts == ts && wv == v)
            });
            if !written {
                violations.push(StaleRead {
                    read: read.clone(),
                    reason: format!("saw ({ts}, {v}), which no write had been invoked with"),
                });
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, invoked: u64, completed: Option<u64>, ts: i64) -> Operation {
        Operation {
            key: key.into(),
            invoked,
            completed,
            kind: Kind::Write { ts, value: ts * 10 },
        }
    }

    fn read(key: &str, invoked: u64, completed: u64, ts: Option<i64>) -> Operation {
        Operation {
            key: key.into(),
            invoked,
            completed: Some(completed),
            kind: Kind::Read {
                value: ts.map(|t| (t, t * 10)),
            },
        }
    }

    #[test]
    fn sequential_histories_check_against_the_model() {
        let ok = [
            read("k", 0, 1, None),
            write("k", 2, Some(3), 1),
            read("k", 4, 5, Some(1)),
            write("k", 6, Some(7), 2),
            read("k", 8, 9, Some(2)),
        ];
        assert!(check(&ok).is_empty());
        // A read after an acknowledged write that misses it: stale.
        let stale = [write("k", 0, Some(1), 1), read("k", 2, 3, None)];
        assert_eq!(check(&stale).len(), 1);
        // Going back in time.
        let back = [
            write("k", 0, Some(1), 1),
            write("k", 2, Some(3), 2),
            read("k", 4, 5, Some(2)),
            read("k", 6, 7, Some(1)),
        ];
        assert_eq!(check(&back).len(), 1);
        // A value nobody wrote.
        assert_eq!(check(&[read("k", 0, 1, Some(9))]).len(), 1);
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps the write: both answers are linearizable.
        for seen in [None, Some(1)] {
            let h = [write("k", 0, Some(10), 1), read("k", 5, 6, seen)];
            assert!(check(&h).is_empty(), "{seen:?}");
        }
        // Two overlapping reads may see the write in one order only: the
        // second (after the first completed) cannot go back.
        let h = [
            write("k", 0, Some(100), 1),
            read("k", 10, 20, Some(1)),
            read("k", 30, 40, None),
        ];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn a_write_that_never_completed_may_or_may_not_have_happened() {
        let happened = [write("k", 0, None, 1), read("k", 5, 6, Some(1))];
        assert!(check(&happened).is_empty());
        let did_not = [write("k", 0, None, 1), read("k", 5, 6, None)];
        assert!(check(&did_not).is_empty());
        // But once seen, it stays.
        let flickers = [
            write("k", 0, None, 1),
            read("k", 5, 6, Some(1)),
            read("k", 7, 8, None),
        ];
        assert_eq!(check(&flickers).len(), 1);
    }

    #[test]
    fn many_writes_lost_in_crashes_are_checked_quickly() {
        // 60 writes that never completed, all overlapping, and reads that see
        // some of them in event-time order: 2^60 subsets without pruning.
        let mut h: Vec<Operation> = (1..=60).map(|ts| write("k", ts as u64, None, ts)).collect();
        for (i, ts) in [3, 10, 10, 25, 47, 60].into_iter().enumerate() {
            let at = 100 + 10 * i as u64;
            h.push(read("k", at, at + 5, Some(ts)));
        }
        assert!(check(&h).is_empty());
        // Seen once, an event time never goes back.
        h.push(read("k", 200, 205, Some(59)));
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn last_write_wins_by_event_time_is_the_model() {
        // An older event time applied after a newer one changes nothing.
        let h = [
            write("k", 0, Some(1), 5),
            write("k", 2, Some(3), 3),
            read("k", 4, 5, Some(5)),
        ];
        assert!(check(&h).is_empty());
        let h = [
            write("k", 0, Some(1), 5),
            write("k", 2, Some(3), 3),
            read("k", 4, 5, Some(3)),
        ];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn keys_are_checked_apart() {
        let h = [
            write("a", 0, Some(1), 1),
            write("b", 0, Some(1), 1),
            read("a", 2, 3, Some(1)),
            read("b", 2, 3, None),
        ];
        let violations = check(&h);
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].key, "b");
    }

    #[test]
    fn the_ledger_finds_lost_acknowledged_writes() {
        let mut ledger = Ledger::default();
        ledger.acknowledge("a", 1, 10);
        ledger.acknowledge("a", 3, 30);
        ledger.acknowledge("b", 2, 20);
        ledger.acknowledge("c", 2, 20);
        let read = BTreeMap::from([
            ("a".to_owned(), Some((4, 40))),
            ("b".to_owned(), Some((1, 10))),
            ("c".to_owned(), None),
        ]);
        let lost = ledger.lost(&read);
        assert_eq!(
            lost,
            vec![
                ("b".to_owned(), (2, 20), Some((1, 10))),
                ("c".to_owned(), (2, 20), None)
            ]
        );
    }

    #[test]
    fn bounded_staleness_allows_lag_within_the_bound_only() {
        let history = vec![write("k", 0, Some(10), 1), write("k", 20, Some(30), 2)];
        let ok = [
            // Within the bound of the second write: the first will do.
            read("k", 100, 110, Some(1)),
            read("k", 1030, 1040, Some(2)),
            // Nothing acknowledged long enough ago yet.
            read("k", 5, 8, None),
        ];
        assert!(stale_reads(&history, &ok, 1000).is_empty());
        let stale = [read("k", 1031, 1040, Some(1)), read("k", 1011, 1040, None)];
        assert_eq!(stale_reads(&history, &stale, 1000).len(), 2);
        // A value nobody wrote, or one written only after the read ended.
        let invented = [read("k", 40, 50, Some(7))];
        assert_eq!(stale_reads(&history, &invented, 1000).len(), 1);
        let future = vec![write("k", 200, None, 9)];
        assert_eq!(
            stale_reads(&future, &[read("k", 40, 50, Some(9))], 1000).len(),
            1
        );
    }
}
