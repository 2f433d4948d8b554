//! One connection's mailbox: a FIFO of frames between the bus (and the session's own
//! replies and catch-up reads) and the task that writes them to the client, whatever the
//! transport, bounded in bytes. Frames are text already rendered; the writer only frames and
//! sends them.
//!
//! Who queues what, and how the budget (`--outbound-bytes`) holds:
//!
//! - The bus **offers** live events ([`Outbound::offer`]) and never waits: over the budget an
//!   event is refused and the queue is left as it is. The bus then stops offering live events
//!   to that connection and has it catch up from the log instead (see `bus::Lag`), so one slow
//!   client never delays the bus or anyone else, and is not dropped either.
//! - Catch-up reads, replays and replies are **paced** ([`Outbound::push_paced`]): they wait
//!   until the queue is at most half full, leaving the other half for live traffic.
//! - A few frames whose place in the stream the bus fixes are **pushed** whatever the budget
//!   ([`Outbound::push`]): markers, `subscribed` (the session waits for room before asking for
//!   one) and the welcome. Each is bounded by what causes it, one per subscription change.
//!
//! So a queue holds at most the budget plus a handful of small frames, whatever the write rate.
//! Closing is the writer's decision (`ws::writer`: too far behind, or a socket that accepts
//! nothing); the mailbox only carries the reason.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

/// A frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Frame {
    /// An event: the envelope as stored in the log (serialized once, shared by every
    /// connection) and the subscriptions of this connection it matches. `history` events
    /// belong to a subscription's catch-up and may be older than live ones before them.
    /// `committed_at` (µs since the epoch) is the source commit of the event when it counts
    /// towards the connection's lag (live events, and catch-ups of a lagging connection), 0
    /// otherwise (`since` history, which the client asked for). `text` is the frame already
    /// rendered when the bus shares one rendering between connections whose subscription ids
    /// are the same, which share `subscriptions` too.
    Event {
        id: u64,
        envelope: Arc<str>,
        subscriptions: Arc<[u32]>,
        history: bool,
        committed_at: i64,
        text: Option<Bytes>,
    },
    /// A control frame, already serialized.
    Control(String),
    /// A historic event of a replay: the envelope and `"replay_id"`.
    Replay { id: u64, envelope: Arc<str>, replay: u32 },
    /// A subscription starts catching up from the log after `from`: with `since` (not sent),
    /// or because its connection fell behind (`lagging`: the writer tells the client).
    CatchingUp { subscription: u32, from: u64, lagging: bool },
    /// A subscription's catch-up ended; it is live. With `caught_up`, the writer tells the
    /// client it has every matching event up to that id (a lagging connection's catch-up).
    Live { subscription: u32, caught_up: Option<u64> },
    /// Something a catch-up tells the client, in the words of the connection's transport.
    Notice(Notice),
}

/// What a catch-up tells the client besides events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The subscription has every matching event up to `last_id` (its `since` history ended).
    CaughtUp { subscription: u32, last_id: u64 },
    /// Events after the subscription's cursor are not in the log: `cursor_expired` (retention
    /// took them; the log starts at `oldest`) or `cursor_ahead` (the cursor is past the log's
    /// head, which ends before `oldest`).
    Reset { subscription: u32, reason: &'static str, oldest: u64 },
}

/// What a queued frame costs besides its text: the frame itself and allocator slack. Without
/// it, a queue of tiny frames would take several times the bytes it counts.
const FRAME_OVERHEAD: usize = std::mem::size_of::<Frame>() + 16;

impl Frame {
    /// Bytes this frame holds while queued, as the budget counts them.
    pub fn size(&self) -> usize {
        FRAME_OVERHEAD
            + match self {
                Frame::Event { envelope, subscriptions, text, .. } => {
                    text.as_ref().map_or(envelope.len(), Bytes::len) + 8 * subscriptions.len()
                }
                Frame::Control(text) => text.len(),
                Frame::Replay { envelope, .. } => envelope.len() + 20,
                Frame::CatchingUp { .. } | Frame::Live { .. } => 0,
                // About what a transport renders it to.
                Frame::Notice(_) => 80,
            }
    }

    /// The UTF-8 text sent on the wire (`None` for markers), shared when already rendered.
    pub fn message(&self) -> Option<Bytes> {
        match self {
            Frame::Event { text: Some(text), .. } => Some(text.clone()),
            _ => self.render().map(Bytes::from),
        }
    }

    /// The text sent on the wire (`None` for markers, which the writer renders when they
    /// announce something): events get `"subscription_ids"` appended to the envelope.
    pub fn render(&self) -> Option<String> {
        match self {
            Frame::CatchingUp { .. } | Frame::Live { .. } | Frame::Notice(_) => None,
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
    /// The client is too slow to be served any longer (4008).
    SlowConsumer(Slow),
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

/// Why a slow consumer is closed: falling behind alone never is a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slow {
    /// What it was last handed is more than this (`--max-lag`) older than the newest event.
    Behind(Duration),
    /// Its socket accepted nothing for this long (`--write-timeout`).
    Stalled(Duration),
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
    /// Over the budget: nothing was queued and nothing else changed.
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
    /// Signalled by the bus when it stopped offering live events and has the connection catch
    /// up from the log; a signal nobody waits for yet is kept for the next wait.
    behind: Notify,
    /// Bytes the queue may hold (`--outbound-bytes`).
    budget: usize,
}

struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    closing: Option<Closing>,
}

impl State {
    /// Whether `bytes` more fit under `limit`. Anything fits an empty queue, so a frame
    /// larger than the budget still goes through, alone.
    fn fits(&self, bytes: usize, limit: usize) -> bool {
        self.frames.is_empty() || self.bytes.saturating_add(bytes) <= limit
    }

    fn enqueue(&mut self, frame: Frame) {
        self.bytes += frame.size();
        self.frames.push_back(frame);
    }
}

impl Outbound {
    /// A mailbox holding at most `budget` bytes of frames (and a few small fixed-place ones).
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State { frames: VecDeque::new(), bytes: 0, closing: None }),
            readable: Notify::new(),
            writable: Notify::new(),
            behind: Notify::new(),
            budget: budget.max(2 * FRAME_OVERHEAD),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent: keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bytes the queue may hold.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Queues a frame if it fits the budget, without waiting; otherwise leaves everything as
    /// it is and says [`Rejected::Full`].
    pub fn offer(&self, frame: Frame) -> Result<(), Rejected> {
        self.offer_all(vec![frame])
    }

    /// Queues all of `frames` if together they fit the budget, or none of them.
    pub fn offer_all(&self, frames: Vec<Frame>) -> Result<(), Rejected> {
        let mut state = self.lock();
        if state.closing.is_some() {
            return Err(Rejected::Closed);
        }
        let size = frames.iter().map(Frame::size).sum();
        if !state.fits(size, self.budget) {
            return Err(Rejected::Full);
        }
        for frame in frames {
            state.enqueue(frame);
        }
        drop(state);
        self.readable.notify_one();
        Ok(())
    }

    /// Queues a frame whatever the budget: for markers and the few frames whose number is
    /// bounded by their cause (see the module doc).
    pub fn push(&self, frame: Frame) -> Result<(), Rejected> {
        let mut state = self.lock();
        if state.closing.is_some() {
            return Err(Rejected::Closed);
        }
        state.enqueue(frame);
        drop(state);
        self.readable.notify_one();
        Ok(())
    }

    /// Queues a frame once the queue, with it, is at most half full.
    pub async fn push_paced(&self, frame: Frame) -> Result<(), Rejected> {
        let size = frame.size();
        self.with_room(size, self.budget / 2, |state| state.enqueue(frame)).await?;
        self.readable.notify_one();
        Ok(())
    }

    /// Resolves once `bytes` more would fit the budget (or the queue is empty).
    pub async fn room(&self, bytes: usize) -> Result<(), Rejected> {
        self.with_room(bytes, self.budget, |_| ()).await
    }

    /// Runs `act` under the lock once `bytes` more fit under `limit`.
    async fn with_room<T>(
        &self,
        bytes: usize,
        limit: usize,
        act: impl FnOnce(&mut State) -> T,
    ) -> Result<T, Rejected> {
        let mut act = Some(act);
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            {
                let mut state = self.lock();
                if state.closing.is_some() {
                    return Err(Rejected::Closed);
                }
                if state.fits(bytes, limit)
                    && let Some(act) = act.take()
                {
                    return Ok(act(&mut state));
                }
            }
            writable.await;
        }
    }

    /// Starts closing. The first reason wins: `false` if closing had already started.
    pub fn close(&self, reason: Closing) -> bool {
        let mut state = self.lock();
        let first = state.closing.is_none();
        if first {
            if !reason.drains() {
                state.frames.clear();
                state.bytes = 0;
            }
            state.closing = Some(reason);
        }
        drop(state);
        self.wake_all();
        first
    }

    fn wake_all(&self) {
        self.readable.notify_waiters();
        self.readable.notify_one();
        self.writable.notify_waiters();
    }

    /// Says that the bus stopped offering live events to this connection and has it catch up
    /// from the log (the session starts the catch-up).
    pub fn fell_behind(&self) {
        self.behind.notify_one();
    }

    /// Resolves after [`Outbound::fell_behind`], once per signal.
    pub async fn behind(&self) {
        self.behind.notified().await;
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

    /// Bytes waiting now, as the budget counts them.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
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
mod tests;
