//! The nouns every stage shares: a captured row change, the event envelope it becomes, its
//! place in the source's order, and time.
//!
//! Nothing here does I/O or knows a stage: capture builds [`Change`]s, the mapping turns them
//! into [`Event`]s, the log numbers and stores them, and everyone above reads them.

mod change;
mod event;
mod time;

pub use change::{Change, TableName};
pub use event::{Event, Op, Position, Row, Severity, Source, Via};
pub use time::{PG_EPOCH_OFFSET_MICROS, Timestamp};
