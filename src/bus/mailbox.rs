//! One connection's mailbox: a bounded FIFO of frames between the bus (and the session's own
//! replies and catch-up reads) and the task that writes them to the client, whatever the
//! transport. Frames are text already rendered; the writer only frames and sends them.
//!
//! Live frames and replies are pushed without waiting ([`Outbound::push`]): when the queue is
//! full the client is not keeping up, the queue is emptied and the connection is marked to be
//! closed with 4008, so one slow client never delays the bus or anyone else. Catch-up reads
//! from the log wait for room instead ([`Outbound::push_paced`]) and only fill half the
//! queue, leaving the rest for live traffic.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

/// A frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Frame {
    /// An event: the envelope as stored in the log (serialized once, shared by every
    /// connection) and the subscriptions of this connection it matches. `history` events
    /// belong to a subscription's catch-up and may be older than live ones before them.
    /// `committed_at` (µs since the epoch) is the source commit of live events, 0 otherwise.
    /// `text` is the frame already rendered when the bus shares one rendering between
    /// connections whose subscription ids are the same.
    Event {
        id: u64,
        envelope: Arc<str>,
        subscriptions: Vec<u32>,
        history: bool,
        committed_at: i64,
        text: Option<Bytes>,
    },
    /// A control frame, already serialized.
    Control(String),
    /// A historic event of a replay: the envelope and `"replay_id"`.
    Replay { id: u64, envelope: Arc<str>, replay: u32 },
    /// Not sent: a subscription starts catching up from `from`.
    CatchingUp { subscription: u32, from: u64 },
    /// Not sent: a subscription's catch-up ended; it is live.
    Live { subscription: u32 },
}

impl Frame {
    fn size(&self) -> usize {
        match self {
            Frame::Event { envelope, subscriptions, .. } => {
                envelope.len() + 8 * subscriptions.len()
            }
            Frame::Control(text) => text.len(),
            Frame::Replay { envelope, .. } => envelope.len() + 20,
            Frame::CatchingUp { .. } | Frame::Live { .. } => 0,
        }
    }

    /// The UTF-8 text sent on the wire (`None` for markers), shared when already rendered.
    pub fn message(&self) -> Option<Bytes> {
        match self {
            Frame::Event { text: Some(text), .. } => Some(text.clone()),
            _ => self.render().map(Bytes::from),
        }
    }

    /// The text sent on the wire (`None` for markers): events get `"subscription_ids"`
    /// appended to the envelope.
    pub fn render(&self) -> Option<String> {
        match self {
            Frame::CatchingUp { .. } | Frame::Live { .. } => None,
            Frame::Control(text) => Some(text.clone()),
            Frame::Replay { envelope, replay, .. } => Some(with_field(envelope, 24, |text| {
                let _ = write!(text, "\"replay_id\":\"r{replay}\"");
            })),
            Frame::Event { envelope, subscriptions, .. } => {
                Some(event_text(envelope, subscriptions))
            }
        }
    }
}

/// An event frame: the envelope with `"subscription_ids"` appended.
pub fn event_text(envelope: &str, subscriptions: &[u32]) -> String {
    with_field(envelope, 24 + 8 * subscriptions.len(), |text| {
        text.push_str("\"subscription_ids\":[");
        for (i, id) in subscriptions.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            // As `protocol::subscription_name` spells them, without a String each.
            let _ = write!(text, "\"s{id}\"");
        }
        text.push(']');
    })
}

/// The envelope with one more field before its closing brace; `field` writes `"name":value`.
fn with_field(envelope: &str, extra: usize, field: impl FnOnce(&mut String)) -> String {
    let body = envelope.trim_end();
    let Some(open) = body.strip_suffix('}') else { return body.to_owned() };
    let mut text = String::with_capacity(body.len() + extra);
    text.push_str(open);
    if !open.trim_end().ends_with('{') {
        text.push(',');
    }
    field(&mut text);
    text.push('}');
    text
}

/// Why a connection is being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closing {
    /// The outbound queue overflowed (4008).
    SlowConsumer,
    /// The server is shutting down: queued frames are written first (1001).
    Shutdown,
    /// The client sent a frame over the size limit (1009).
    FrameTooLarge,
    /// Nothing heard from the client for too long (1000).
    Idle,
    /// The connection's token expired and was not refreshed (4001).
    TokenExpired,
    /// The client kept sending over its message rate (1008).
    RateLimited,
    /// The client broke the WebSocket protocol: 1007 for text that is not UTF-8, else 1002.
    BadFrame { code: u16, reason: &'static str },
    /// The client closed or the socket failed: nothing more to write.
    Gone,
}

impl Closing {
    /// Whether queued frames are still written before closing: yes, unless the client cannot
    /// take them (slow, gone) or may no longer see them (expired token).
    fn drains(&self) -> bool {
        matches!(
            self,
            Closing::Shutdown
                | Closing::RateLimited
                | Closing::FrameTooLarge
                | Closing::BadFrame { .. }
                | Closing::Idle
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is full; the connection is now closing as a slow consumer.
    Full,
    /// The connection is closing.
    Closed,
}

pub enum Next {
    Frame(Frame),
    Close(Closing),
}

pub struct Outbound {
    state: Mutex<State>,
    /// Signalled when a frame is pushed or closing starts.
    readable: Notify,
    /// Signalled when the writer takes a frame or closing starts.
    writable: Notify,
    max_frames: usize,
    max_bytes: usize,
}

struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    closing: Option<Closing>,
}

impl Outbound {
    pub fn new(max_frames: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State { frames: VecDeque::new(), bytes: 0, closing: None }),
            readable: Notify::new(),
            writable: Notify::new(),
            max_frames: max_frames.max(2),
            max_bytes: max_bytes.max(2),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent: keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame without waiting. On overflow the queue is dropped and the connection
    /// starts closing as a slow consumer.
    pub fn push(&self, frame: Frame) -> Result<(), Rejected> {
        let mut state = self.lock();
        if state.closing.is_some() {
            return Err(Rejected::Closed);
        }
        let size = frame.size();
        // A single frame larger than the byte bound still goes through an empty queue.
        let full = state.frames.len() >= self.max_frames
            || (!state.frames.is_empty() && state.bytes + size > self.max_bytes);
        if full {
            state.frames.clear();
            state.bytes = 0;
            state.closing = Some(Closing::SlowConsumer);
            drop(state);
            self.wake_all();
            return Err(Rejected::Full);
        }
        state.bytes += size;
        state.frames.push_back(frame);
        drop(state);
        self.readable.notify_one();
        Ok(())
    }

    /// Queues a frame once the queue is at most half full.
    pub async fn push_paced(&self, frame: Frame) -> Result<(), Rejected> {
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            {
                let mut state = self.lock();
                if state.closing.is_some() {
                    return Err(Rejected::Closed);
                }
                let size = frame.size();
                let room = state.frames.len() < self.max_frames / 2
                    && (state.frames.is_empty() || state.bytes + size <= self.max_bytes / 2);
                if room {
                    state.bytes += size;
                    state.frames.push_back(frame);
                    drop(state);
                    self.readable.notify_one();
                    return Ok(());
                }
            }
            writable.await;
        }
    }

    /// Starts closing. The first reason wins.
    pub fn close(&self, reason: Closing) {
        let mut state = self.lock();
        if state.closing.is_none() {
            if !reason.drains() {
                state.frames.clear();
                state.bytes = 0;
            }
            state.closing = Some(reason);
        }
        drop(state);
        self.wake_all();
    }

    fn wake_all(&self) {
        self.readable.notify_waiters();
        self.readable.notify_one();
        self.writable.notify_waiters();
    }

    /// The next frame to write, or why to close once nothing is left to write.
    pub async fn next(&self) -> Next {
        loop {
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(frame) = state.frames.pop_front() {
                    state.bytes -= frame.size();
                    drop(state);
                    self.writable.notify_waiters();
                    return Next::Frame(frame);
                }
                if let Some(closing) = &state.closing {
                    return Next::Close(closing.clone());
                }
            }
            readable.await;
        }
    }

    /// The next frame if one is queued now (never the close).
    pub fn try_next(&self) -> Option<Frame> {
        let mut state = self.lock();
        let frame = state.frames.pop_front()?;
        state.bytes -= frame.size();
        drop(state);
        self.writable.notify_waiters();
        Some(frame)
    }

    /// Resolves once closing started for a reason that drops what is queued: a write in
    /// progress is abandoned then.
    pub async fn interrupted(&self) {
        loop {
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            if self.lock().closing.as_ref().is_some_and(|c| !c.drains()) {
                return;
            }
            readable.await;
        }
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closing(&self) -> bool {
        self.lock().closing.is_some()
    }

    /// What is queued right now, for tests.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> Vec<Frame> {
        self.lock().frames.iter().cloned().collect()
    }

    /// Takes everything queued without waiting (benchmarks drain queues with this).
    pub fn drain_now(&self) -> Vec<Frame> {
        let mut state = self.lock();
        state.bytes = 0;
        let frames = state.frames.drain(..).collect();
        drop(state);
        self.writable.notify_waiters();
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(text: &str) -> Frame {
        Frame::Control(text.into())
    }

    fn take(outbound: &Outbound) -> Option<String> {
        let next = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_millis(50), outbound.next()).await
            });
        match next {
            Ok(Next::Frame(frame)) => frame.render(),
            Ok(Next::Close(reason)) => Some(format!("close {reason:?}")),
            Err(_) => None,
        }
    }

    #[test]
    fn events_carry_their_subscriptions() {
        let event = |envelope: &str, subscriptions| Frame::Event {
            id: 1,
            envelope: envelope.into(),
            subscriptions,
            history: false,
            committed_at: 0,
            text: None,
        };
        let frame = event(r#"{"id":1}"#, vec![1, 3]);
        assert_eq!(frame.render().as_deref(), Some(r#"{"id":1,"subscription_ids":["s1","s3"]}"#));
        let frame = event("{}\n", vec![2]);
        assert_eq!(frame.render().as_deref(), Some(r#"{"subscription_ids":["s2"]}"#));
        assert_eq!(Frame::Live { subscription: 1 }.render(), None);
    }

    #[test]
    fn overflow_drops_the_queue_and_closes_as_slow() {
        let outbound = Outbound::new(3, 1 << 20);
        for i in 0..3 {
            outbound.push(control(&i.to_string())).expect("room");
        }
        assert_eq!(outbound.push(control("3")), Err(Rejected::Full));
        assert_eq!(outbound.push(control("4")), Err(Rejected::Closed));
        assert_eq!(take(&outbound).as_deref(), Some("close SlowConsumer"));
    }

    #[test]
    fn byte_bound_counts_but_one_big_frame_passes() {
        let outbound = Outbound::new(100, 10);
        outbound.push(control("a very long frame indeed")).expect("alone it passes");
        assert_eq!(outbound.push(control("x")), Err(Rejected::Full));
    }

    #[test]
    fn shutdown_drains_first() {
        let outbound = Outbound::new(10, 1 << 20);
        outbound.push(control("a")).expect("room");
        outbound.close(Closing::Shutdown);
        outbound.close(Closing::Idle);
        assert_eq!(take(&outbound).as_deref(), Some("a"));
        assert_eq!(take(&outbound).as_deref(), Some("close Shutdown"));
    }

    #[tokio::test]
    async fn paced_pushes_wait_for_half_the_queue() {
        let outbound = Outbound::new(4, 1 << 20);
        outbound.push_paced(control("a")).await.expect("room");
        outbound.push_paced(control("b")).await.expect("room");
        let third = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            outbound.push_paced(control("c")),
        )
        .await;
        assert!(third.is_err(), "half full: waits");
        let waiting = {
            let outbound = outbound.clone();
            tokio::spawn(async move { outbound.push_paced(control("c")).await })
        };
        assert!(matches!(outbound.next().await, Next::Frame(_)));
        waiting.await.expect("joined").expect("pushed after the writer took one");
        outbound.close(Closing::Gone);
        assert_eq!(outbound.push_paced(control("d")).await, Err(Rejected::Closed));
    }
}
