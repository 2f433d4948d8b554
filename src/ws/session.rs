//! One WebSocket connection: reads client frames, answers them, keeps the connection's
//! subscriptions, and starts their catch-ups and its replays; the `writer` writes what
//! all of them queue.
//!
//! ```text
//!   client --frames--> read loop --replies--+
//!                      bus.publish ---------+--> Outbound (bounded) --> write loop --> client
//!                      catch-up (history) --+
//!                      lag catch-up --------+   (when the bus says the connection fell behind)
//!                      replays (history) ---+
//! ```
//!
//! Replies wait for room in the mailbox like catch-ups do: a client that does not read its
//! frames is not read from either, until the writer gives up on it (`--write-timeout`).
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
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::ws::Message;
use futures_util::{Sink, Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub use super::context::Context;
use super::limits::{RateLimit, Verdict};
use super::protocol::{self, Action, ErrorCode, ProtocolError, Start};
use super::replay::Replay;
use super::writer::{Ended, Writer};
use crate::auth::Scope;
use crate::bus::catch_up::{self, CatchUp};
use crate::bus::lag::LagCatchUp;
use crate::bus::mailbox::{Closing, Frame, Outbound};
use crate::bus::{ConnectionId, SubscriptionId};
use crate::filter::Filter;
use crate::log::History;

/// What the handshake's query string asked for.
pub type Initial = Result<Option<(Filter, Start)>, ProtocolError>;

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
    let outbound = Outbound::new(limits.outbound_bytes);
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
        replay_slots: Arc::new(Semaphore::new(limits.max_replays)),
        lag: None,
        lag_progress: Arc::default(),
    };
    match initial {
        Ok(Some((filter, start))) => session.subscribe(filter, start, None).await,
        Ok(None) => {}
        Err(err) => session.reply(protocol::error(&err, None)).await,
    }
    let writer = Writer {
        outbound: &outbound,
        limits,
        metrics: &context.metrics,
        bus: &context.bus,
        welcome_id: head,
    };
    let mut writing = pin!(writer.run(sink));
    let mut stream = pin!(stream);
    let ended = tokio::select! {
        ended = &mut writing => Some(ended),
        () = session.read_loop(stream.as_mut()) => {
            // The reader saw the end or chose a close code; let the writer say it.
            let grace = limits.close_timeout * 2;
            tokio::time::timeout(grace, &mut writing).await.ok()
        }
    };
    outbound.close(Closing::Gone);
    session.end();
    // A slow consumer may well be sending while we close: its 4008 must not be lost to a reset.
    // (Other closes do not wait; a shutdown in particular has better things to do.)
    if ended == Some(Ended::CloseSent(4008)) {
        linger(stream, limits.close_timeout).await;
    }
    tracing::debug!(connection, "websocket closed");
}

/// After our close frame, reads (and drops) what the client still sends until its own close
/// frame, for at most `limit`: a socket closed with unread input is reset, and a reset may
/// destroy our close frame before the client has read it.
async fn linger<R>(mut stream: Pin<&mut R>, limit: std::time::Duration)
where
    R: Stream<Item = Result<Message, axum::Error>>,
{
    let answered = async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(limit, answered).await;
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
    /// One permit per replay that may run (`max_replays`): a replay gives its permit back
    /// before it says it finished.
    replay_slots: Arc<Semaphore>,
    /// The catch-up of the connection while it lags (it fell behind), and how far it got.
    lag: Option<JoinHandle<()>>,
    lag_progress: Arc<AtomicU64>,
}

impl<H: History> Session<H> {
    /// Queues a reply once the mailbox has room for it (nothing to do if it is closing).
    async fn reply(&self, text: String) {
        let _ = self.outbound.push_paced(Frame::Control(text)).await;
    }

    async fn error(
        &self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<&serde_json::Value>,
    ) {
        let err = ProtocolError { code, message: message.into() };
        self.reply(protocol::error(&err, reference)).await;
    }

    async fn read_loop<R>(&mut self, mut stream: Pin<&mut R>)
    where
        R: Stream<Item = Result<Message, axum::Error>>,
    {
        let idle_timeout = self.context.limits.idle_timeout;
        let mut idle = tokio::time::Instant::now() + idle_timeout;
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                () = tokio::time::sleep_until(idle) => {
                    self.outbound.close(Closing::Idle);
                    return;
                }
                () = self.scope.expired() => {
                    self.outbound.close(Closing::TokenExpired);
                    return;
                }
                () = self.outbound.behind() => {
                    if self.context.bus.claim_lag(self.connection) {
                        self.lag_progress.store(0, std::sync::atomic::Ordering::Relaxed);
                        self.catch_up_lag();
                    }
                    continue;
                }
            };
            idle = tokio::time::Instant::now() + idle_timeout;
            let message = match message {
                None => {
                    self.outbound.close(Closing::Gone);
                    return;
                }
                Some(Err(err)) => {
                    self.outbound.close(closing_for(err));
                    return;
                }
                Some(Ok(message)) => message,
            };
            if matches!(message, Message::Text(_) | Message::Binary(_)) {
                match self.rate.take() {
                    Verdict::Allowed => {}
                    Verdict::Limited => {
                        // The refusal answers this frame: it carries the frame's `ref`.
                        let reference = match &message {
                            Message::Text(text) => protocol::parse(text.as_str()).reference,
                            _ => None,
                        };
                        let limit = self.context.limits.message_rate;
                        let text = format!("more than {limit} frames per second; slow down");
                        self.error(ErrorCode::RateLimited, text, reference.as_ref()).await;
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
                Message::Binary(_) => {
                    self.error(
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text frames",
                        None,
                    )
                    .await
                }
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
            Err(err) => return self.reply(protocol::error(&err, reference)).await,
        };
        match action {
            Action::Subscribe { filter, start } => {
                if self.subscriptions.len() >= self.context.limits.max_subscriptions {
                    let limit = self.context.limits.max_subscriptions;
                    let message = format!("a connection may hold at most {limit} subscriptions");
                    return self.error(ErrorCode::TooManySubscriptions, message, reference).await;
                }
                self.subscribe(filter, start, reference).await;
            }
            Action::Unsubscribe { subscription } => {
                let number = protocol::subscription_number(&subscription)
                    .filter(|n| self.subscriptions.contains_key(n));
                let Some(number) = number else {
                    let message = format!("no subscription {subscription:?} on this connection");
                    return self.error(ErrorCode::NotFound, message, reference).await;
                };
                if let Some(Some(catch_up)) = self.subscriptions.remove(&number) {
                    // Wait for it to stop so nothing of it follows `unsubscribed`.
                    catch_up.abort();
                    let _ = catch_up.await;
                }
                // The lag's catch-up may be sending frames that name it: stop it too, and start
                // it again for the others from where it got.
                let mut lag_stopped = false;
                if let Some(lag) = self.lag.take() {
                    lag.abort();
                    lag_stopped = lag.await.is_err_and(|err| err.is_cancelled());
                }
                self.context.bus.unsubscribe(self.connection, number);
                if lag_stopped {
                    self.catch_up_lag();
                }
                // Its catch-up position no longer counts for the slow-consumer reason.
                let _ = self.outbound.push(Frame::Live { subscription: number, caught_up: None });
                self.reply(protocol::unsubscribed(&subscription, reference)).await;
            }
            Action::GetMetadata => {
                let metadata = (self.context.metadata)(self.scope.clone()).await;
                self.reply(protocol::metadata(&metadata, reference)).await
            }
            Action::Auth { token } => match self.context.limits.auth.verify(Some(&token)) {
                Ok(fresh) if fresh.same_grant(&self.scope) => {
                    self.scope = fresh;
                    self.reply(protocol::authenticated(self.scope.expires_at, reference)).await;
                }
                Ok(_) => {
                    self.error(
                        ErrorCode::Forbidden,
                        "a refreshed token must grant the same organizations and domains; reconnect to change them",
                        reference,
                    )
                    .await
                }
                Err(err) => self.error(ErrorCode::Forbidden, err.to_string(), reference).await,
            },
            Action::Ping => self.reply(protocol::pong(reference)).await,
            Action::Replay { filter, from, to, speed } => {
                self.replays.retain(|_, task| !task.is_finished());
                let Ok(slot) = self.replay_slots.clone().try_acquire_owned() else {
                    let limit = self.context.limits.max_replays;
                    let message = format!("at most {limit} replays may run at once");
                    return self.error(ErrorCode::TooManySubscriptions, message, reference).await;
                };
                if let Err(err) = filter.check_redactions(self.context.mapping.redactions()) {
                    return self.error(ErrorCode::BadRequest, err.to_string(), reference).await;
                }
                let filter = match self.scope.confine(filter) {
                    Ok(filter) => filter,
                    Err(message) => {
                        return self.error(ErrorCode::Forbidden, message, reference).await;
                    }
                };
                let number = self.next_replay;
                self.next_replay = self.next_replay.wrapping_add(1).max(1);
                let replay = Replay {
                    slot,
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
                    return self.error(ErrorCode::NotFound, message, reference).await;
                };
                // Wait for it to stop so none of its frames follow `replay_stopped`.
                task.abort();
                let _ = task.await;
                self.reply(protocol::replay_stopped(&replay, reference)).await;
            }
        }
    }

    async fn subscribe(
        &mut self,
        filter: Filter,
        start: Start,
        reference: Option<&serde_json::Value>,
    ) {
        if let Err(err) = filter.check_redactions(self.context.mapping.redactions()) {
            return self.error(ErrorCode::BadRequest, err.to_string(), reference).await;
        }
        let filter = match self.scope.confine(filter) {
            Ok(filter) => filter,
            Err(message) => return self.error(ErrorCode::Forbidden, message, reference).await,
        };
        let number = self.next;
        let Some(next) = self.next.checked_add(1) else {
            let message = "this connection has used up its subscription ids; reconnect";
            return self.error(ErrorCode::TooManySubscriptions, message, reference).await;
        };
        self.next = next;
        // The bus queues `subscribed` whatever the budget, in its place among live events: it
        // gets the room a paced reply would.
        if self.outbound.room(self.outbound.budget() / 2).await.is_err() {
            return;
        }
        let filter = Arc::new(filter);
        // A `history` subscription catches up from the head as far as the bus and a 4008's
        // resume id are concerned: the events before `last_id` it asked for are context, not a
        // cursor it holds, and where they start is known only once `last_id` is.
        if let Start::Since(since) = start {
            // A cursor from a gateway ahead of this one: wait for it rather than reset.
            self.context.bus.wait_for_head(since, self.context.limits.cursor_ahead_wait).await;
        }
        let since = match start {
            Start::Live => None,
            Start::Since(since) => Some(since),
            Start::History(_) => Some(u64::MAX),
        };
        let subscribed =
            self.context.bus.subscribe(self.connection, number, filter.clone(), since, |head| {
                protocol::subscribed(number, &filter, head, reference)
            });
        let Ok(last_id) = subscribed else { return };
        let from = match start {
            Start::Live => None,
            Start::Since(since) => Some(catch_up::Start::Since(since)),
            Start::History(count) => Some(catch_up::Start::Last(count)),
        };
        let catch_up = from.map(|from| {
            let catch_up = CatchUp {
                sources: self.context.clone(),
                connection: self.connection,
                subscription: number,
                filter,
                outbound: self.outbound.clone(),
            };
            tokio::spawn(catch_up.run(from, last_id))
        });
        self.subscriptions.insert(number, catch_up);
    }

    /// Starts the catch-up of the connection's lag (which ends at once if there is none).
    fn catch_up_lag(&mut self) {
        let catch_up = LagCatchUp {
            sources: self.context.clone(),
            connection: self.connection,
            outbound: self.outbound.clone(),
            progress: self.lag_progress.clone(),
        };
        // A catch-up that just went live may still be finishing: it does nothing more.
        self.lag = Some(tokio::spawn(catch_up.run()));
    }

    fn end(self) {
        self.context.bus.disconnect(self.connection);
        for catch_up in self.subscriptions.into_values().flatten() {
            catch_up.abort();
        }
        if let Some(lag) = self.lag {
            lag.abort();
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
