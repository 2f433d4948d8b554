//! Proving that a replication source continues where the log left off, before streaming.
//!
//! A logical slot only remembers where *it* is. If it was dropped and recreated, consumed by
//! someone else, or the database was restored or recreated under the same name, the slot
//! streams from somewhere the log has never been, and the changes in between are gone without
//! an error from Postgres. rowcast compares what the log recorded with what the server says:
//!
//! - the cluster's system identifier (`IDENTIFY_SYSTEM`) must be the one the source was first
//!   captured from: another one means a restore or a new cluster;
//! - the log's progress must not be beyond the server's WAL end: a cursor from the future means
//!   the database was restored or recreated and its WAL restarted below it;
//! - the slot must exist: a missing slot means everything committed since the log's progress
//!   is no longer retained anywhere;
//! - the slot's confirmed position must not be beyond the log's progress: rowcast acknowledges
//!   only what the log holds (see `LogWriter::cursor`), so a slot ahead of it was recreated or
//!   consumed by someone else.
//!
//! Any of these is a continuity break: capture stops, loudly, until an operator accepts the gap
//! (`rowcast accept-gap`), which records it in the log as a `rowcast.gap` event. The checks are
//! pure: the caller gathers both sides.

use crate::pg::{Lsn, format_lsn};

/// What the log remembers of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Whether the source was captured into this log before.
    pub known: bool,
    pub system_identifier: Option<String>,
    /// Everything before this position is in the log.
    pub progress: Lsn,
}

/// What the server says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub system_identifier: String,
    /// The server's WAL end (`IDENTIFY_SYSTEM`'s xlogpos).
    pub wal_end: Lsn,
    /// The slot, if it exists: its confirmed position (`None` before its first confirmation).
    pub slot: Option<Option<Lsn>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Never captured into this log: create the slot if needed and record the cluster.
    FirstCapture,
    /// Continuity holds. `record` says the cluster must still be recorded (a log written before
    /// rowcast recorded it).
    Continues {
        record: bool,
    },
    Broken(Break),
}

/// Why continuity cannot be proven, and the range of WAL that may be lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("continuity of the source cannot be proven: {reason}")]
pub struct Break {
    pub reason: String,
    /// The log's progress: everything before it is in the log.
    pub from: Lsn,
    /// Where capture would resume, when known (the slot's position or the server's WAL end).
    pub to: Option<Lsn>,
}

pub fn check(slot_name: &str, recorded: &Recorded, observed: &Observed) -> Verdict {
    if !recorded.known {
        return Verdict::FirstCapture;
    }
    let from = recorded.progress;
    let broken = |reason: String, to: Option<Lsn>| Verdict::Broken(Break { reason, from, to });
    if let Some(recorded_id) = &recorded.system_identifier
        && *recorded_id != observed.system_identifier
    {
        return broken(
            format!(
                "the source is another Postgres cluster (system identifier {}, the log's is {recorded_id}): it was restored or recreated",
                observed.system_identifier
            ),
            None,
        );
    }
    if from > observed.wal_end {
        return broken(
            format!(
                "the log has captured up to {} but the server's WAL ends at {}: the database was restored or recreated",
                format_lsn(from),
                format_lsn(observed.wal_end)
            ),
            Some(observed.wal_end),
        );
    }
    let Some(confirmed) = observed.slot else {
        return broken(
            format!(
                "replication slot {slot_name:?} no longer exists: changes committed after {} may not be retained anywhere",
                format_lsn(from)
            ),
            Some(observed.wal_end),
        );
    };
    // Before the cluster is recorded the log may predate acknowledging only what it holds.
    if recorded.system_identifier.is_some()
        && let Some(confirmed) = confirmed
        && confirmed > from
    {
        return broken(
            format!(
                "replication slot {slot_name:?} has confirmed {} but the log holds changes up to {} only: the slot was recreated or consumed by another client",
                format_lsn(confirmed),
                format_lsn(from)
            ),
            Some(confirmed),
        );
    }
    Verdict::Continues { record: recorded.system_identifier.is_none() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(progress: Lsn) -> Recorded {
        Recorded { known: true, system_identifier: Some("7300".into()), progress }
    }

    fn observed(wal_end: Lsn, slot: Option<Option<Lsn>>) -> Observed {
        Observed { system_identifier: "7300".into(), wal_end, slot }
    }

    fn reason(verdict: Verdict) -> String {
        match verdict {
            Verdict::Broken(broken) => broken.reason,
            other => panic!("expected a break, got {other:?}"),
        }
    }

    #[test]
    fn a_source_that_continues() {
        let holds = check("s", &recorded(100), &observed(500, Some(Some(100))));
        assert_eq!(holds, Verdict::Continues { record: false });
        // The slot may lag behind the log (acknowledgements are asynchronous).
        let lagging = check("s", &recorded(100), &observed(500, Some(Some(40))));
        assert_eq!(lagging, Verdict::Continues { record: false });
        let fresh_slot = check("s", &recorded(100), &observed(500, Some(None)));
        assert_eq!(fresh_slot, Verdict::Continues { record: false });
    }

    #[test]
    fn first_capture_and_logs_that_predate_recording() {
        let unknown = Recorded { known: false, system_identifier: None, progress: 0 };
        assert_eq!(check("s", &unknown, &observed(500, None)), Verdict::FirstCapture);
        let old = Recorded { known: true, system_identifier: None, progress: 100 };
        // An older log may have acknowledged past its progress: not held against it.
        let verdict = check("s", &old, &observed(500, Some(Some(300))));
        assert_eq!(verdict, Verdict::Continues { record: true });
    }

    #[test]
    fn each_break_says_what_happened() {
        let other = Observed { system_identifier: "9999".into(), wal_end: 500, slot: Some(None) };
        assert!(reason(check("s", &recorded(100), &other)).contains("another Postgres cluster"));
        let behind = reason(check("s", &recorded(0x2_0000_0000), &observed(0x100, Some(None))));
        assert!(behind.contains("2/0") && behind.contains("0/100"), "{behind}");
        let dropped = check("s", &recorded(100), &observed(500, None));
        assert_eq!(
            dropped,
            Verdict::Broken(Break { reason: reason(dropped.clone()), from: 100, to: Some(500) })
        );
        assert!(reason(dropped).contains("no longer exists"));
        let ahead = reason(check("s", &recorded(100), &observed(500, Some(Some(200)))));
        assert!(ahead.contains("recreated or consumed"), "{ahead}");
    }
}
