//! One WebSocket connection: reads client frames, answers them, keeps the connection's
//! subscriptions, and starts their catch-ups and its replays; the `writer` writes what
//! all of them queue.
//!
//! ```text
//!   client --frames--> read loop --replies--+
//!                      bus.publish ---------+--> Outbound (bounded) --> write loop --> client
//!                      catch-up (history) --+
//!                      replays (history) ---+
//! ```
//!
//! The session is generic over its transport (a [`Sink`] and a [`Stream`] of axum messages)
//! and over the log it reads ([`History`]), so its logic is tested through channels and an
//! in-memory log; [`super::upgrade`] hands it the real socket and the real log.
//!
//! It sees the server through a [`Context`], not the whole `AppState`: the limits and the
//! token verifier, the bus, the log, the metrics and the metadata answer. That is all a
//! connection may touch, and a test builds one from those parts, without a database pool,
//! a publisher or the other state the HTTP side keeps.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;

use axum::extract::ws::Message;
use futures_util::{Sink, Stream, StreamExt};
use tokio::task::JoinHandle;

use super::catch_up::CatchUp;
pub use super::context::Context;
use super::history::History;
use super::limits::{RateLimit, Verdict};
use super::protocol::{self, Action, ErrorCode, ProtocolError};
use super::replay::Replay;
use super::writer::write_loop;
use crate::auth::Scope;
use crate::bus::mailbox::{Closing, Frame, Outbound};
use crate::bus::{ConnectionId, SubscriptionId};
use crate::filter::Filter;

/// The furthest a token's expiry is scheduled; a token may claim an `exp` centuries away.
const LONGEST_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// What the handshake's query string asked for.
pub type Initial = Result<Option<(Filter, Option<u64>)>, ProtocolError>;

/// Serves one connection until it closes: `sink` and `stream` are the two halves of its
/// transport, `scope` what its token grants, `initial` the subscription its query asked for.
pub async fn run<W, R, H>(
    sink: W,
    stream: R,
    context: Arc<Context<H>>,
    scope: Scope,
    initial: Initial,
) where
    W: Sink<Message, Error = axum::Error> + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Send,
    H: History,
{
    let limits = &context.limits;
    let outbound = Outbound::new(limits.outbound_frames, limits.outbound_bytes);
    let (connection, head) = context.bus.connect(outbound.clone());
    tracing::debug!(connection, "websocket connected");
    // The queue is empty: the welcome always fits.
    let _ = outbound.push(Frame::Control(protocol::welcome(&format!("c{connection}"), head)));
    let rate = RateLimit::new(limits.message_rate, limits.message_burst);
    let mut session = Session {
        context: context.clone(),
        connection,
        outbound: outbound.clone(),
        next: 1,
        subscriptions: HashMap::new(),
        scope,
        rate,
        next_replay: 1,
        replays: HashMap::new(),
    };
    match initial {
        Ok(Some((filter, since))) => session.subscribe(filter, since, None),
        Ok(None) => {}
        Err(err) => session.reply(protocol::error(&err, None)),
    }
    let mut writing = pin!(write_loop(sink, &outbound, limits, &context.metrics, head));
    tokio::select! {
        () = &mut writing => {}
        () = session.read_loop(stream) => {
            // The reader saw the end or chose a close code; let the writer say it.
            let grace = limits.close_timeout * 2;
            let _ = tokio::time::timeout(grace, &mut writing).await;
        }
    }
    outbound.close(Closing::Gone);
    session.end();
    tracing::debug!(connection, "websocket closed");
}

struct Session<H> {
    context: Arc<Context<H>>,
    connection: ConnectionId,
    outbound: Arc<Outbound>,
    next: SubscriptionId,
    /// Every subscription with its catch-up task while it catches up.
    subscriptions: HashMap<SubscriptionId, Option<JoinHandle<()>>>,
    /// What the connection's token grants.
    scope: Scope,
    rate: RateLimit,
    next_replay: u32,
    replays: HashMap<u32, JoinHandle<()>>,
}

impl<H: History> Session<H> {
    fn reply(&self, text: String) {
        // A full queue closes the connection as a slow consumer; nothing else to do here.
        if self.outbound.push(Frame::Control(text)).is_err() {
            self.context.bus.disconnect(self.connection);
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

    async fn read_loop<R>(&mut self, stream: R)
    where
        R: Stream<Item = Result<Message, axum::Error>>,
    {
        let mut stream = pin!(stream);
        let idle_timeout = self.context.limits.idle_timeout;
        loop {
            let expiry = self.scope.expires_at.map(deadline);
            let message = tokio::select! {
                message = tokio::time::timeout(idle_timeout, stream.next()) => message,
                () = sleep_until(expiry) => {
                    self.outbound.close(Closing::TokenExpired);
                    return;
                }
            };
            let message = match message {
                Err(_) => {
                    self.outbound.close(Closing::Idle);
                    return;
                }
                Ok(None) => {
                    self.outbound.close(Closing::Gone);
                    return;
                }
                Ok(Some(Err(err))) => {
                    self.outbound.close(closing_for(err));
                    return;
                }
                Ok(Some(Ok(message))) => message,
            };
            if matches!(message, Message::Text(_) | Message::Binary(_)) {
                match self.rate.take() {
                    Verdict::Allowed => {}
                    Verdict::Limited => {
                        let limit = self.context.limits.message_rate;
                        let message = format!("more than {limit} frames per second; slow down");
                        self.error(ErrorCode::RateLimited, message, None);
                        continue;
                    }
                    Verdict::Abusive => {
                        self.outbound.close(Closing::RateLimited);
                        return;
                    }
                }
            }
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
                if self.subscriptions.len() >= self.context.limits.max_subscriptions {
                    let limit = self.context.limits.max_subscriptions;
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
                self.context.bus.unsubscribe(self.connection, number);
                // Its catch-up position no longer counts for the slow-consumer reason.
                let _ = self.outbound.push(Frame::Live { subscription: number });
                self.reply(protocol::unsubscribed(&subscription, reference));
            }
            Action::GetMetadata => {
                let metadata = (self.context.metadata)(&self.scope);
                self.reply(protocol::metadata(&metadata, reference))
            }
            Action::Auth { token } => match self.context.limits.auth.verify(Some(&token)) {
                Ok(fresh) if fresh.same_grant(&self.scope) => {
                    self.scope = fresh;
                    self.reply(protocol::authenticated(self.scope.expires_at, reference));
                }
                Ok(_) => self.error(
                    ErrorCode::Forbidden,
                    "a refreshed token must grant the same organizations and domains; reconnect to change them",
                    reference,
                ),
                Err(err) => self.error(ErrorCode::Forbidden, err.to_string(), reference),
            },
            Action::Ping => self.reply(protocol::pong(reference)),
            Action::Replay { filter, from, to, speed } => {
                self.replays.retain(|_, task| !task.is_finished());
                let limit = self.context.limits.max_replays;
                if self.replays.len() >= limit {
                    let message = format!("at most {limit} replays may run at once");
                    return self.error(ErrorCode::TooManySubscriptions, message, reference);
                }
                let filter = match self.scope.confine(filter) {
                    Ok(filter) => filter,
                    Err(message) => return self.error(ErrorCode::Forbidden, message, reference),
                };
                let number = self.next_replay;
                self.next_replay = self.next_replay.wrapping_add(1).max(1);
                let replay = Replay {
                    context: self.context.clone(),
                    outbound: self.outbound.clone(),
                    number,
                    filter,
                    from: from.to_system_time(),
                    to: to.to_system_time(),
                    speed,
                };
                let reference = reference.cloned();
                self.replays.insert(number, tokio::spawn(replay.run(reference)));
            }
            Action::StopReplay { replay } => {
                let number = protocol::replay_number(&replay);
                let Some(task) = number.and_then(|n| self.replays.remove(&n)) else {
                    let message = format!("no replay {replay:?} on this connection");
                    return self.error(ErrorCode::NotFound, message, reference);
                };
                // Wait for it to stop so none of its frames follow `replay_stopped`.
                task.abort();
                let _ = task.await;
                self.reply(protocol::replay_stopped(&replay, reference));
            }
        }
    }

    fn subscribe(
        &mut self,
        filter: Filter,
        since: Option<u64>,
        reference: Option<&serde_json::Value>,
    ) {
        let filter = match self.scope.confine(filter) {
            Ok(filter) => filter,
            Err(message) => return self.error(ErrorCode::Forbidden, message, reference),
        };
        let number = self.next;
        let Some(next) = self.next.checked_add(1) else {
            let message = "this connection has used up its subscription ids; reconnect";
            return self.error(ErrorCode::TooManySubscriptions, message, reference);
        };
        self.next = next;
        let filter = Arc::new(filter);
        let subscribed =
            self.context.bus.subscribe(self.connection, number, filter.clone(), since, |head| {
                protocol::subscribed(number, &filter, head, reference)
            });
        let Ok(last_id) = subscribed else { return };
        let catch_up = since.map(|since| {
            let catch_up = CatchUp {
                context: self.context.clone(),
                connection: self.connection,
                subscription: number,
                filter,
                outbound: self.outbound.clone(),
            };
            tokio::spawn(catch_up.run(since, last_id))
        });
        self.subscriptions.insert(number, catch_up);
    }

    fn end(self) {
        self.context.bus.disconnect(self.connection);
        for catch_up in self.subscriptions.into_values().flatten() {
            catch_up.abort();
        }
        for replay in self.replays.into_values() {
            replay.abort();
        }
    }
}

/// How to close after a read error.
fn closing_for(err: axum::Error) -> Closing {
    use tokio_tungstenite::tungstenite::Error;
    match err.into_inner().downcast_ref::<Error>() {
        Some(Error::Capacity(_)) => Closing::FrameTooLarge,
        Some(Error::Utf8(_)) => Closing::BadFrame { code: 1007, reason: "text frame is not UTF-8" },
        Some(Error::Protocol(_)) => {
            Closing::BadFrame { code: 1002, reason: "websocket protocol error" }
        }
        _ => Closing::Gone,
    }
}

/// The tokio instant of a Unix time in seconds.
fn deadline(unix_seconds: u64) -> tokio::time::Instant {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let left = std::time::Duration::from_secs(unix_seconds).saturating_sub(now).min(LONGEST_EXPIRY);
    tokio::time::Instant::now() + left
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
