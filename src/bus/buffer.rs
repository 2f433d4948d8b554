//! What the bus keeps for subscriptions that catch up from the log while events are published:
//! every match above a cursor, so that the catch-up can hand over to live delivery under the
//! bus lock with no gap and no duplicate, without reading the log up to the very last event.
//!
//! A buffer is bounded twice: in events, and in bytes by its connection's outbound budget
//! (shared by all the connection's buffers). Past either bound it gives up (overflows): the
//! catch-up reads further from the log and buffering starts over from the head.

use std::sync::Arc;

use super::SubscriptionId;
use super::mailbox::Frame;
use crate::log::StoredEvent;

/// Events buffered for one catch-up before it reads from the log again.
pub(super) const CATCH_UP_BUFFER: usize = 4096;

/// Every match with an id above `from`, unless it overflowed (`events` is `None`).
pub(super) struct Buffer {
    from: u64,
    events: Option<Vec<Buffered>>,
    /// Bytes held, counted in the connection's total too.
    bytes: usize,
}

pub(super) struct Buffered {
    id: u64,
    envelope: Arc<str>,
    committed_at: i64,
    subscriptions: Vec<SubscriptionId>,
}

impl Buffered {
    pub(super) fn new(event: &StoredEvent, subscriptions: Vec<SubscriptionId>) -> Self {
        let (id, envelope, committed_at) = (event.id, event.json.clone(), event.timestamp.0);
        Self { id, envelope, committed_at, subscriptions }
    }

    fn size(&self) -> usize {
        self.envelope.len() + 8 * self.subscriptions.len() + std::mem::size_of::<Self>()
    }
}

impl Buffer {
    pub(super) fn new(from: u64) -> Self {
        Self { from, events: Some(Vec::new()), bytes: 0 }
    }

    /// Keeps `event` unless the connection's buffers (`held` bytes in all) would go over
    /// `budget`, or this one over [`CATCH_UP_BUFFER`] events: then it overflows.
    pub(super) fn keep(&mut self, event: Buffered, held: &mut usize, budget: usize) {
        let Some(events) = &mut self.events else { return };
        let size = event.size();
        if events.len() < CATCH_UP_BUFFER && held.saturating_add(size) <= budget {
            events.push(event);
            self.bytes += size;
            *held += size;
        } else {
            self.events = None;
            *held = held.saturating_sub(self.bytes);
            self.bytes = 0;
        }
    }

    /// Whether it holds every match after `cursor`.
    pub(super) fn covers(&self, cursor: u64) -> bool {
        self.events.is_some() && self.from <= cursor
    }

    /// The frames of the kept events after `cursor`, for the subscriptions `keep` accepts;
    /// an event left with none is not sent.
    pub(super) fn frames_after(
        &self,
        cursor: u64,
        keep: impl Fn(SubscriptionId) -> bool,
    ) -> Vec<Frame> {
        let events = self.events.iter().flatten().filter(|event| event.id > cursor);
        events
            .filter_map(|event| {
                let subscriptions: Vec<SubscriptionId> =
                    event.subscriptions.iter().copied().filter(|s| keep(*s)).collect();
                (!subscriptions.is_empty()).then(|| Frame::Event {
                    id: event.id,
                    envelope: event.envelope.clone(),
                    subscriptions: subscriptions.into(),
                    history: true,
                    committed_at: event.committed_at,
                    text: None,
                })
            })
            .collect()
    }

    /// Starts over: keeps matches after `from` from now on.
    pub(super) fn restart(&mut self, from: u64, held: &mut usize) {
        *held = held.saturating_sub(self.bytes);
        *self = Buffer::new(from);
    }

    /// Gives its bytes back to the connection's total.
    pub(super) fn release(self, held: &mut usize) {
        *held = held.saturating_sub(self.bytes);
    }
}
