//! Capture: committed row changes out of Postgres, in commit order.
//!
//! ```text
//! replication.rs  the streaming replication protocol (connect, auth, slot, CopyBoth)
//! pgoutput.rs     pgoutput protocol 1 messages -> typed LogicalMessage (pure)
//! catalog.rs      column type OIDs -> render::Kind, looked up once per type
//! stream.rs       relation cache + transactions -> mapped events, keepalives -> progress
//! ```
//!
//! A source emits [`Captured`] items in order. `Progress(p)` promises that everything the
//! source will ever need to resend after `p` comes after it: once the items before it are
//! durable in the log, the source may be acknowledged up to `p`.

pub mod catalog;
pub mod pgoutput;
pub mod replication;
pub mod stream;
pub mod triggers;

use crate::event::{Event, Op, Position, Row, Timestamp};
use crate::mapping::TableName;

/// One committed row change, rendered (`to_jsonb` form, nothing redacted yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: TableName,
    pub op: Op,
    pub new: Option<Row>,
    pub old: Option<Row>,
    /// Commit time (replication) or statement time (triggers).
    pub timestamp: Timestamp,
    /// Commit LSN, replication only.
    pub lsn: Option<u64>,
    pub xid: u64,
}

/// What flows from a source to the log, in source order.
#[derive(Debug)]
// Nearly every item is an event: boxing it would cost an allocation on the hot path to save
// memory on the rare progress item.
#[allow(clippy::large_enum_variant)]
pub enum Captured {
    Event { position: Position, event: Event },
    Progress(u64),
}
