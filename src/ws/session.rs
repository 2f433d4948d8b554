//! One WebSocket connection: reads client frames, answers them, and writes what the bus and
//! catch-up reads queue for it, with keepalive pings, an idle timeout and close codes.
//!
//! ```text
//!   client --frames--> read loop --replies--+
//!                      bus.publish ---------+--> Outbound (bounded) --> write loop --> client
//!                      catch-up (log) ------+
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;

use super::outbound::{Closing, Frame, Next, Outbound};
use super::protocol::{self, Action, ErrorCode, ProtocolError};
use crate::bus::{ConnectionId, GoLive, SubscriptionId};
use crate::filter::Filter;
use crate::log::Range;
use crate::server::Shared;

/// Events per catch-up read.
const CATCH_UP_PAGE: usize = 500;

/// What the handshake's query string asked for.
pub type Initial = Result<Option<(Filter, Option<u64>)>, ProtocolError>;

pub async fn run(socket: WebSocket, shared: Arc<Shared>, initial: Initial) {
    let limits = &shared.settings.server;
    let outbound = Outbound::new(limits.outbound_frames, limits.outbound_bytes);
    let (connection, head) = shared.bus.connect(outbound.clone());
    tracing::debug!(connection, "websocket connected");
    // The queue is empty: the welcome always fits.
    let _ = outbound.push(Frame::Control(protocol::welcome(&format!("c{connection}"), head)));
    let mut session = Session {
        shared: shared.clone(),
        connection,
        outbound,
        next: 1,
        subscriptions: HashMap::new(),
    };
    match initial {
        Ok(Some((filter, since))) => session.subscribe(filter, since, None),
        Ok(None) => {}
        Err(err) => session.reply(protocol::error(&err, None)),
    }
    let (sink, stream) = socket.split();
    let writing = write_loop(sink, session.outbound.clone(), shared.clone(), head);
    tokio::pin!(writing);
    let outbound = session.outbound.clone();
    tokio::select! {
        () = &mut writing => {}
        () = session.read_loop(stream) => {
            // The reader saw the end or chose a close code; let the writer say it.
            let grace = shared.settings.server.close_timeout * 2;
            let _ = tokio::time::timeout(grace, &mut writing).await;
        }
    }
    outbound.close(Closing::Gone);
    session.end().await;
    tracing::debug!(connection, "websocket closed");
}

struct Session {
    shared: Arc<Shared>,
    connection: ConnectionId,
    outbound: Arc<Outbound>,
    next: SubscriptionId,
    /// Every subscription with its catch-up task while it catches up.
    subscriptions: HashMap<SubscriptionId, Option<JoinHandle<()>>>,
}

impl Session {
    fn reply(&self, text: String) {
        // A full queue closes the connection as a slow consumer; nothing else to do here.
        if self.outbound.push(Frame::Control(text)).is_err() {
            self.shared.bus.disconnect(self.connection);
        }
    }

    fn error(
        &self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<&serde_json::Value>,
    ) {
        let err = ProtocolError { code, message: message.into() };
        self.reply(protocol::error(&err, reference));
    }

    async fn read_loop(&mut self, mut stream: SplitStream<WebSocket>) {
        let limits = self.shared.settings.server.clone();
        loop {
            let message = match tokio::time::timeout(limits.idle_timeout, stream.next()).await {
                Err(_) => {
                    self.outbound.close(Closing::Idle);
                    return;
                }
                Ok(None) => {
                    self.outbound.close(Closing::Gone);
                    return;
                }
                Ok(Some(Err(err))) => {
                    if too_large(err) {
                        self.outbound.close(Closing::FrameTooLarge);
                    } else {
                        self.outbound.close(Closing::Gone);
                    }
                    return;
                }
                Ok(Some(Ok(message))) => message,
            };
            match message {
                Message::Text(text) => self.handle(text.as_str()).await,
                Message::Binary(_) => self.error(
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                    None,
                ),
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(_) => {
                    self.outbound.close(Closing::Gone);
                    return;
                }
            }
            if self.outbound.is_closing() {
                return;
            }
        }
    }

    async fn handle(&mut self, text: &str) {
        let request = protocol::parse(text);
        let reference = request.reference.as_ref();
        let action = match request.action {
            Ok(action) => action,
            Err(err) => return self.reply(protocol::error(&err, reference)),
        };
        match action {
            Action::Subscribe { filter, since } => {
                if self.subscriptions.len() >= self.shared.settings.server.max_subscriptions {
                    let limit = self.shared.settings.server.max_subscriptions;
                    let message = format!("a connection may hold at most {limit} subscriptions");
                    return self.error(ErrorCode::TooManySubscriptions, message, reference);
                }
                self.subscribe(filter, since, reference);
            }
            Action::Unsubscribe { subscription } => {
                let number = protocol::subscription_number(&subscription)
                    .filter(|n| self.subscriptions.contains_key(n));
                let Some(number) = number else {
                    let message = format!("no subscription {subscription:?} on this connection");
                    return self.error(ErrorCode::NotFound, message, reference);
                };
                if let Some(Some(catch_up)) = self.subscriptions.remove(&number) {
                    // Wait for it to stop so nothing of it follows `unsubscribed`.
                    catch_up.abort();
                    let _ = catch_up.await;
                }
                self.shared.bus.unsubscribe(self.connection, number);
                // Its catch-up position no longer counts for the slow-consumer reason.
                let _ = self.outbound.push(Frame::Live { subscription: number });
                self.reply(protocol::unsubscribed(&subscription, reference));
            }
            Action::GetMetadata => {
                self.reply(protocol::metadata(&crate::http::metadata(&self.shared), reference))
            }
            Action::Ping => self.reply(protocol::pong(reference)),
            Action::Unsupported(name) => self.error(
                ErrorCode::BadRequest,
                format!("{name} is not available in this version of rowcast"),
                reference,
            ),
        }
    }

    fn subscribe(
        &mut self,
        filter: Filter,
        since: Option<u64>,
        reference: Option<&serde_json::Value>,
    ) {
        let number = self.next;
        let Some(next) = self.next.checked_add(1) else {
            let message = "this connection has used up its subscription ids; reconnect";
            return self.error(ErrorCode::TooManySubscriptions, message, reference);
        };
        self.next = next;
        let filter = Arc::new(filter);
        let subscribed =
            self.shared.bus.subscribe(self.connection, number, filter.clone(), since, |head| {
                protocol::subscribed(number, &filter, head, reference)
            });
        let Ok(last_id) = subscribed else { return };
        let catch_up = since.map(|since| {
            let catch_up = CatchUp {
                shared: self.shared.clone(),
                connection: self.connection,
                subscription: number,
                filter,
                outbound: self.outbound.clone(),
            };
            tokio::spawn(catch_up.run(since, last_id))
        });
        self.subscriptions.insert(number, catch_up);
    }

    async fn end(self) {
        self.shared.bus.disconnect(self.connection);
        for catch_up in self.subscriptions.into_values().flatten() {
            catch_up.abort();
        }
    }
}

fn too_large(err: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    matches!(err.into_inner().downcast_ref::<Error>(), Some(Error::Capacity(_)))
}

/// Sends history from the log to a new subscription with `since`, then makes it live.
///
/// Events `since < id <= last_id` (the `subscribed.last_id`) come first, then `caught_up`.
/// Events published while reading are read from the log too, until the bus head equals the
/// cursor under the bus lock: only then does the subscription go live, so the hand-off has
/// no gap and no duplicate.
struct CatchUp {
    shared: Arc<Shared>,
    connection: ConnectionId,
    subscription: SubscriptionId,
    filter: Arc<Filter>,
    outbound: Arc<Outbound>,
}

impl CatchUp {
    async fn run(self, since: u64, last_id: u64) {
        let mut cursor = since;
        if since > last_id {
            // A cursor from a log this one never had (or a different database).
            let frame = protocol::reset(self.subscription, "cursor_ahead", last_id + 1);
            if self.push(Frame::Control(frame)).await.is_err() {
                return;
            }
            cursor = last_id;
        }
        let mut target = last_id;
        let mut caught_up = false;
        loop {
            while cursor < target {
                let Some(next) = self.read(cursor, target).await else { return };
                cursor = next;
            }
            if !caught_up {
                caught_up = true;
                let frame = protocol::caught_up(self.subscription, last_id);
                if self.push(Frame::Control(frame)).await.is_err() {
                    return;
                }
            }
            match self.shared.bus.go_live(self.connection, self.subscription, cursor) {
                GoLive::Live | GoLive::Gone => return,
                GoLive::Behind(head) => target = head,
            }
        }
    }

    /// Sends one page after `cursor`; returns the new cursor, `None` when the connection is
    /// closing.
    async fn read(&self, cursor: u64, target: u64) -> Option<u64> {
        let range = Range {
            after: cursor,
            up_to: Some(target),
            from: None,
            to: None,
            limit: CATCH_UP_PAGE,
        };
        let mut backoff = std::time::Duration::from_millis(100);
        let page = loop {
            let result = match self.shared.log.get().await {
                Ok(client) => crate::log::read(&client, &self.filter, &range).await,
                Err(err) => Err(err.into()),
            };
            match result {
                Ok(page) => break page,
                Err(err) => {
                    tracing::warn!(connection = self.connection, error = %err, "catch-up read failed; retrying");
                    if self.outbound.is_closing() {
                        return None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
            }
        };
        if page.oldest > cursor + 1 {
            let frame = protocol::reset(self.subscription, "cursor_expired", page.oldest);
            self.push(Frame::Control(frame)).await.ok()?;
        }
        let full = page.events.len() == CATCH_UP_PAGE;
        let mut next = target;
        for (id, envelope) in page.events {
            next = id;
            let frame = Frame::Event {
                id,
                envelope: envelope.into(),
                subscriptions: vec![self.subscription],
                history: true,
            };
            self.push(frame).await.ok()?;
        }
        Some(if full { next } else { target })
    }

    async fn push(&self, frame: Frame) -> Result<(), super::outbound::Rejected> {
        self.outbound.push_paced(frame).await
    }
}

/// Where a connection's delivery stands, for the 4008 reason: an id such that everything up
/// to it that any subscription should get has been handed to the socket.
struct Delivered {
    /// The last live event written (the welcome's `last_id` before any).
    live: u64,
    /// Catching-up subscriptions and the last history event written for each.
    catching_up: HashMap<SubscriptionId, u64>,
}

impl Delivered {
    fn note(&mut self, frame: &Frame) {
        match frame {
            Frame::Event { id, history: false, .. } => self.live = *id,
            Frame::Event { id, subscriptions, history: true, .. } => {
                for subscription in subscriptions {
                    if let Some(at) = self.catching_up.get_mut(subscription) {
                        *at = (*at).max(*id);
                    }
                }
            }
            Frame::CatchingUp { subscription, from } => {
                self.catching_up.insert(*subscription, *from);
            }
            Frame::Live { subscription } => {
                self.catching_up.remove(subscription);
            }
            Frame::Control(_) => {}
        }
    }

    fn resume_from(&self) -> u64 {
        self.catching_up.values().copied().fold(self.live, u64::min)
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    outbound: Arc<Outbound>,
    shared: Arc<Shared>,
    welcome_id: u64,
) {
    let limits = &shared.settings.server;
    let mut delivered = Delivered { live: welcome_id, catching_up: HashMap::new() };
    let start = tokio::time::Instant::now() + limits.ping_interval;
    let mut ping = tokio::time::interval_at(start, limits.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            next = outbound.next() => match next {
                Next::Frame(frame) => {
                    delivered.note(&frame);
                    match frame.render() {
                        Some(text) => Message::Text(text.into()),
                        None => continue,
                    }
                }
                Next::Close(reason) => {
                    let close = match reason {
                        Closing::SlowConsumer => Some((
                            4008,
                            format!("slow consumer; last delivered id {}", delivered.resume_from()),
                        )),
                        Closing::Shutdown => Some((1001, "server shutting down".to_owned())),
                        Closing::FrameTooLarge => Some((
                            1009,
                            format!("frame too large (limit {} bytes)", limits.max_frame_bytes),
                        )),
                        Closing::Idle => Some((1000, "idle timeout".to_owned())),
                        Closing::Gone => None,
                    };
                    if let Some((code, reason)) = close {
                        let frame = CloseFrame { code, reason: reason.into() };
                        let closing = sink.send(Message::Close(Some(frame)));
                        let _ = tokio::time::timeout(limits.close_timeout, closing).await;
                    }
                    let _ = tokio::time::timeout(limits.close_timeout, sink.close()).await;
                    return;
                }
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        tokio::select! {
            sent = sink.send(message) => if sent.is_err() {
                outbound.close(Closing::Gone);
                return;
            },
            // A write stuck on a client that stopped reading; the close frame follows what
            // was already handed to the socket.
            () = outbound.interrupted() => {}
        }
    }
}
