//! Sessions driven through channels, as a client would drive them, with no socket and no
//! database: the client's frames go in through an mpsc stream, the server's come out of a
//! bounded mpsc sink (its capacity plays the socket's send buffer), and the log is
//! [`MemoryLog`]. Every test runs on tokio's paused clock: timeouts and pings happen in
//! virtual time, and a frame that never comes fails the test at once instead of hanging it.

mod catch_up;
mod closing;
mod dispatch;
mod lagging;
mod replay;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Message;
use futures_util::{Sink, SinkExt};
use serde_json::{Value, json};
use tokio::sync::{RwLock, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use super::protocol::Start;
use super::session::{self, Context, Initial};
use crate::auth::Scope;
use crate::bus::Bus;
use crate::config::ServerSettings;
use crate::filter::{Envelope, Filter};
use crate::log::History;
use crate::log::{LogError, Page, Range, StoredEvent};
use crate::model::{Severity, Timestamp};

/// Longer than any timer a session sets: waiting this long means nothing is coming.
const WAIT: Duration = Duration::from_secs(3600);

/// The event log in memory, read as `crate::log::read` and `crate::log::count` read Postgres.
#[derive(Default)]
pub(super) struct MemoryLog {
    state: Mutex<LogState>,
    /// Reads wait while a test holds this for writing: a log that is slow right now.
    gate: RwLock<()>,
}

#[derive(Default)]
struct LogState {
    events: Vec<StoredEvent>,
    /// The last id ever appended, as `rowcast.log_head`.
    head: u64,
}

impl MemoryLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn append(&self, events: &[StoredEvent]) {
        let mut state = self.lock();
        for event in events {
            state.head = state.head.max(event.id);
            state.events.push(event.clone());
        }
    }

    /// Retention: drops events before `id`.
    pub(super) fn trim_before(&self, id: u64) {
        self.lock().events.retain(|event| event.id >= id);
    }

    fn matching<'a>(
        events: &'a [StoredEvent],
        filter: &'a Filter,
        from: Option<SystemTime>,
        to: Option<SystemTime>,
    ) -> impl Iterator<Item = &'a StoredEvent> {
        events.iter().filter(move |event| {
            let at = committed_at(event);
            let envelope = Envelope::new(&event.json);
            let subject = event.subject(&envelope);
            from.is_none_or(|from| at >= from)
                && to.is_none_or(|to| at < to)
                && filter.matches(&subject)
        })
    }
}

impl History for MemoryLog {
    async fn read(&self, filter: &Filter, range: &Range) -> Result<Page, LogError> {
        drop(self.gate.read().await);
        let state = self.lock();
        let oldest = state.events.first().map_or(state.head + 1, |event| event.id);
        let mut page = Page { oldest, ..Page::default() };
        let events = MemoryLog::matching(&state.events, filter, range.from, range.to)
            .filter(|event| event.id > range.after)
            .filter(|event| range.up_to.is_none_or(|up_to| event.id <= up_to))
            .take(range.limit);
        for event in events {
            page.events.push((event.id, event.json.to_string()));
            page.committed_at.push(committed_at(event));
        }
        Ok(page)
    }

    async fn oldest_of_last(
        &self,
        filter: &Filter,
        up_to: u64,
        count: usize,
    ) -> Result<Option<u64>, LogError> {
        drop(self.gate.read().await);
        let state = self.lock();
        let matching = MemoryLog::matching(&state.events, filter, None, None);
        let ids: Vec<u64> = matching.map(|event| event.id).filter(|id| *id <= up_to).collect();
        Ok(ids.len().checked_sub(count.max(1)).map_or(ids.first(), |skip| ids.get(skip)).copied())
    }

    async fn count(
        &self,
        filter: &Filter,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<u64, LogError> {
        drop(self.gate.read().await);
        let state = self.lock();
        Ok(MemoryLog::matching(&state.events, filter, Some(from), Some(to)).count() as u64)
    }
}

fn committed_at(event: &StoredEvent) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(event.timestamp.0.max(0) as u64)
}

/// An event of `kind` committed `second`s into 2026.
pub(super) fn event(id: u64, kind: &str, second: i64) -> StoredEvent {
    const NEW_YEAR_2026: i64 = 1_767_225_600;
    StoredEvent {
        id,
        event_type: kind.into(),
        organization_id: None,
        domain_id: None,
        severity: Severity::Info,
        timestamp: Timestamp((NEW_YEAR_2026 + second) * 1_000_000),
        json: json!({"id": id, "type": kind}).to_string().into(),
    }
}

/// `agent.created` events with these ids, a second apart.
pub(super) fn agents(ids: impl IntoIterator<Item = u64>) -> Vec<StoredEvent> {
    ids.into_iter().map(|id| event(id, "agent.created", id as i64)).collect()
}

/// A server context over an in-memory log holding `history`; the bus starts at its head.
pub(super) fn context(limits: ServerSettings, history: &[StoredEvent]) -> Arc<Context<MemoryLog>> {
    let log = MemoryLog::default();
    log.append(history);
    let metrics = Arc::default();
    let head = history.last().map_or(0, |event| event.id);
    Arc::new(Context {
        limits,
        bus: Arc::new(Bus::new(head, Arc::clone(&metrics))),
        history: log,
        metrics,
        metadata: Box::new(|_| Box::pin(async { json!({"entities": []}) })),
        mapping: Arc::new(crate::mapping::Mapping::builtin()),
    })
}

/// What the publisher does with new events: append them to the log, then offer them to the bus.
pub(super) fn commit(context: &Context<MemoryLog>, events: &[StoredEvent]) {
    context.history.append(events);
    context.bus.publish(events);
}

/// The client end of a session.
pub(super) struct Client {
    to_server: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    pub(super) from_server: mpsc::Receiver<Message>,
    pub(super) session: JoinHandle<()>,
    /// Whether the session closed its socket before a close frame with a code went in.
    codeless: Arc<AtomicBool>,
}

/// The server's end of a test socket: frames go into a bounded channel, as into a socket's
/// send buffer. Closing a WebSocket sink before a close frame with a code went in is what
/// makes axum (tungstenite) send one without a code, the 1005 a client must never see; this
/// socket records whether the session ever did.
struct Socket {
    frames: PollSender<Message>,
    coded: bool,
    codeless: Arc<AtomicBool>,
}

impl Sink<Message> for Socket {
    type Error = axum::Error;

    fn poll_ready(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.frames.poll_ready_unpin(cx).map_err(axum::Error::new)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        self.coded |= matches!(message, Message::Close(Some(_)));
        self.frames.start_send_unpin(message).map_err(axum::Error::new)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.frames.poll_flush_unpin(cx).map_err(axum::Error::new)
    }

    fn poll_close(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        if !self.coded {
            self.codeless.store(true, Ordering::Relaxed);
        }
        self.frames.poll_close_unpin(cx).map_err(axum::Error::new)
    }
}

/// Starts a session for a client whose socket holds `room` frames it has not read yet.
pub(super) fn connect<H: History>(
    context: &Arc<Context<H>>,
    scope: Scope,
    initial: Initial,
    room: usize,
) -> Client {
    let (to_server, mut incoming) = mpsc::unbounded_channel();
    let (outgoing, from_server) = mpsc::channel(room);
    let codeless = Arc::new(AtomicBool::new(false));
    let sink =
        Socket { frames: PollSender::new(outgoing), coded: false, codeless: codeless.clone() };
    let stream = futures_util::stream::poll_fn(move |cx| incoming.poll_recv(cx));
    let session = tokio::spawn(session::run(sink, stream, context.clone(), scope, initial));
    Client { to_server, from_server, session, codeless }
}

/// A session with no initial subscription, a roomy socket and a token that grants everything.
pub(super) fn open<H: History>(context: &Arc<Context<H>>) -> Client {
    connect(context, Scope::everything(), Ok(None), 100_000)
}

impl Client {
    /// Whether the session ever closed the socket before a close frame with a code went in.
    pub(super) fn closed_without_a_code(&self) -> bool {
        self.codeless.load(Ordering::Relaxed)
    }

    pub(super) fn send(&self, frame: Value) {
        self.send_message(Ok(Message::Text(frame.to_string().into())));
    }

    pub(super) fn send_message(&self, message: Result<Message, axum::Error>) {
        // The session may have ended already; then its replies tell the test so.
        let _ = self.to_server.send(message);
    }

    /// The next frame the server wrote, pings included; `None` once it dropped the socket.
    pub(super) async fn next_message(&mut self) -> Option<Message> {
        tokio::time::timeout(WAIT, self.from_server.recv()).await.expect("the session wrote")
    }

    /// The next frame other than a ping.
    pub(super) async fn next(&mut self) -> Option<Message> {
        loop {
            match self.next_message().await {
                Some(Message::Ping(_)) => continue,
                other => return other,
            }
        }
    }

    /// The next frame, which must be JSON text.
    pub(super) async fn json(&mut self) -> Value {
        match self.next().await {
            Some(Message::Text(text)) => serde_json::from_str(text.as_str()).expect("json"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a close frame with a code.
    pub(super) async fn close(&mut self) -> (u16, String) {
        match self.next().await {
            Some(Message::Close(Some(frame))) => (frame.code, frame.reason.to_string()),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Text frames up to the close frame, and the close frame (`None`: no close frame).
    pub(super) async fn until_close(&mut self) -> (Vec<Value>, Option<(u16, String)>) {
        let mut frames = Vec::new();
        loop {
            match self.next().await {
                Some(Message::Text(text)) => {
                    frames.push(serde_json::from_str(text.as_str()).expect("json"));
                }
                Some(Message::Close(Some(frame))) => {
                    return (frames, Some((frame.code, frame.reason.to_string())));
                }
                None => return (frames, None),
                Some(Message::Close(None)) => panic!("a close frame without a code"),
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Sends a ping with `reference` and returns every frame before its pong: what the session
    /// had queued up to now.
    pub(super) async fn sync(&mut self, reference: &str) -> Vec<Value> {
        self.send(json!({"action": "ping", "ref": reference}));
        let mut before = Vec::new();
        loop {
            let frame = self.json().await;
            if frame == json!({"type": "pong", "ref": reference}) {
                return before;
            }
            before.push(frame);
        }
    }
}

/// The `id`s of event frames (types with a dot), in order.
pub(super) fn event_ids(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter(|f| is_event(f)).filter_map(|f| f["id"].as_u64()).collect()
}

pub(super) fn is_event(frame: &Value) -> bool {
    frame["type"].as_str().is_some_and(|kind| kind.contains('.'))
}
