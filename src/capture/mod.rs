//! Capture: committed row changes out of Postgres, in commit order.
//!
//! ```text
//! replication/    the streaming replication protocol (connect, auth, slot, CopyBoth)
//! pgoutput/       pgoutput protocol 1 messages -> typed LogicalMessage (pure), and back
//! catalog.rs      column type OIDs -> render::Category, looked up once per type
//! continuity.rs   proof that the slot continues where the log left off (pure)
//! render/         a column's text output -> the JSON `to_jsonb` gives, by type family
//! stream.rs       relation cache + transactions -> mapped events, keepalives -> progress
//! triggers.rs     the fallback source: drains the outbox row triggers fill
//! ```
//!
//! A source emits [`Captured`] items in order. `Progress(p)` promises that everything the
//! source will ever need to resend after `p` comes after it: once the items before it are
//! durable in the log, the source may be acknowledged up to `p`.

pub mod catalog;
pub mod continuity;
pub mod pgoutput;
pub mod render;
pub mod replication;
pub mod stream;
pub mod triggers;

use crate::model::{Event, Position};

/// What flows from a source to the log, in source order.
#[derive(Debug)]
// Nearly every item is an event: boxing it would cost an allocation on the hot path to save
// memory on the rare progress item.
#[allow(clippy::large_enum_variant)]
pub enum Captured {
    Event {
        position: Position,
        event: Event,
    },
    Progress(u64),
    /// The transaction of a switch marker committed at this end LSN: from here on this source
    /// captures what the old one no longer does (see [`stream::Marker`]).
    MarkerPassed(u64),
}
