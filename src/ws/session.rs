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

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;

use super::protocol::{self, Action, ErrorCode, ProtocolError};
use crate::auth::Scope;
use crate::bus::mailbox::{Closing, Frame, Next, Outbound, Rejected};
use crate::bus::{ConnectionId, GoLive, SubscriptionId};
use crate::filter::Filter;
use crate::http::AppState;
use crate::log::Range;

/// Events per catch-up read.
const CATCH_UP_PAGE: usize = 500;
/// The first wait before a failed catch-up read is tried again; it doubles up to the max.
const CATCH_UP_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const CATCH_UP_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// The furthest a token's expiry is scheduled; a token may claim an `exp` centuries away.
const LONGEST_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// What the handshake's query string asked for.
pub type Initial = Result<Option<(Filter, Option<u64>)>, ProtocolError>;

pub async fn run(socket: WebSocket, shared: Arc<AppState>, scope: Scope, initial: Initial) {
    let limits = &shared.settings.server;
    let outbound = Outbound::new(limits.outbound_frames, limits.outbound_bytes);
    let (connection, head) = shared.bus.connect(outbound.clone());
    tracing::debug!(connection, "websocket connected");
    // The queue is empty: the welcome always fits.
    let _ = outbound.push(Frame::Control(protocol::welcome(&format!("c{connection}"), head)));
    let rate = RateLimit::new(limits.message_rate, limits.message_burst);
    let mut session = Session {
        shared: shared.clone(),
        connection,
        outbound,
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
    session.end();
    tracing::debug!(connection, "websocket closed");
}

struct Session {
    shared: Arc<AppState>,
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
            let expiry = self.scope.expires_at.map(deadline);
            let message = tokio::select! {
                message = tokio::time::timeout(limits.idle_timeout, stream.next()) => message,
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
                        let limit = limits.message_rate;
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
                let metadata = crate::http::metadata::build(&self.shared, &self.scope);
                self.reply(protocol::metadata(&metadata, reference))
            }
            Action::Auth { token } => match self.shared.settings.server.auth.verify(Some(&token)) {
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
                let limit = self.shared.settings.server.max_replays;
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
                    shared: self.shared.clone(),
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

    fn end(self) {
        self.shared.bus.disconnect(self.connection);
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

/// Sends history from the log to a new subscription with `since`, then makes it live.
///
/// Events `since < id <= last_id` (the `subscribed.last_id`) come first, then `caught_up`.
/// Events published while reading are read from the log too, until the bus head equals the
/// cursor under the bus lock: only then does the subscription go live, so the hand-off has
/// no gap and no duplicate.
struct CatchUp {
    shared: Arc<AppState>,
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
        let mut backoff = CATCH_UP_RETRY_FIRST;
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
                    backoff = (backoff * 2).min(CATCH_UP_RETRY_MAX);
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
                committed_at: 0,
                text: None,
            };
            self.push(frame).await.ok()?;
        }
        Some(if full { next } else { target })
    }

    async fn push(&self, frame: Frame) -> Result<(), Rejected> {
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
            Frame::Control(_) | Frame::Replay { .. } => {}
        }
    }

    fn resume_from(&self) -> u64 {
        self.catching_up.values().copied().fold(self.live, u64::min)
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    outbound: Arc<Outbound>,
    shared: Arc<AppState>,
    welcome_id: u64,
) {
    let limits = &shared.settings.server;
    let mut delivered = Delivered { live: welcome_id, catching_up: HashMap::new() };
    let start = tokio::time::Instant::now() + limits.ping_interval;
    let mut ping = tokio::time::interval_at(start, limits.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message: (Message, Option<Frame>) = tokio::select! {
            next = outbound.next() => match next {
                Next::Frame(frame) => match frame.message() {
                    Some(text) => (Message::Text(utf8(text)), Some(frame)),
                    None => {
                        // Markers only move the delivery position.
                        delivered.note(&frame);
                        continue;
                    }
                },
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
                        Closing::TokenExpired => Some((4001, "token expired".to_owned())),
                        Closing::RateLimited => Some((1008, "rate limit exceeded".to_owned())),
                        Closing::BadFrame { code, reason } => Some((code, reason.to_owned())),
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
            _ = ping.tick() => (Message::Ping(Default::default()), None),
        };
        // Whatever else is already queued goes in the same write: one syscall for a burst.
        // Markers have no message; they only move the delivery position, in order.
        let (first, frame) = message;
        let mut batch: Vec<(Option<Message>, Option<Frame>)> = vec![(Some(first), frame)];
        while batch.len() < WRITE_BATCH {
            let Some(frame) = outbound.try_next() else { break };
            batch.push((frame.message().map(|text| Message::Text(utf8(text))), Some(frame)));
        }
        let metrics = &shared.metrics;
        let delivered = &mut delivered;
        let write = async {
            for (message, frame) in batch {
                if let Some(message) = message {
                    sink.feed(message).await?;
                }
                // Delivered once tungstenite holds it: a close frame written later follows it.
                if let Some(frame) = frame {
                    delivered.note(&frame);
                    if let Frame::Event { history: false, committed_at, .. } = &frame {
                        metrics.sent(crate::model::Timestamp::now().0 - committed_at);
                    }
                }
            }
            sink.flush().await
        };
        tokio::select! {
            sent = write => if sent.is_err() {
                outbound.close(Closing::Gone);
                return;
            },
            // A write stuck on a client that stopped reading; the close frame follows what
            // was already handed to the socket.
            () = outbound.interrupted() => {}
        }
    }
}

/// Mailbox text as a WebSocket text payload. Frames are rendered from `String`s, so this
/// validation (a scan, no copy) cannot fail; if it ever did, the frame would go out lossy
/// rather than not at all.
fn utf8(text: bytes::Bytes) -> Utf8Bytes {
    Utf8Bytes::try_from(text.clone())
        .unwrap_or_else(|_| Utf8Bytes::from(String::from_utf8_lossy(&text).into_owned()))
}

/// Most frames written to one connection per flush.
const WRITE_BATCH: usize = 64;

/// Events per replay read.
const REPLAY_PAGE: usize = 500;
/// The longest a replay waits between two events, however far apart they were.
const REPLAY_MAX_GAP: std::time::Duration = std::time::Duration::from_secs(3);
/// How often a replay reports progress, in events.
const REPLAY_PROGRESS_EVERY: u64 = 100;

/// One replay: historic events in `[from, to)`, paced like they happened, `speed` times faster.
struct Replay {
    shared: Arc<AppState>,
    outbound: Arc<Outbound>,
    number: u32,
    filter: Filter,
    from: std::time::SystemTime,
    to: std::time::SystemTime,
    speed: f64,
}

impl Replay {
    async fn run(self, reference: Option<serde_json::Value>) {
        if let Err(err) = self.play(reference.as_ref()).await {
            tracing::warn!(error = %err, "replay failed");
            let failed = protocol::replay_failed(self.number);
            let _ = self.outbound.push_paced(Frame::Control(failed)).await;
        }
    }

    async fn play(
        &self,
        reference: Option<&serde_json::Value>,
    ) -> Result<(), crate::log::LogError> {
        let client = self.shared.log.get().await?;
        let total = crate::log::count(&client, &self.filter, self.from, self.to).await?;
        let push = |frame| self.outbound.push_paced(frame);
        if push(Frame::Control(protocol::replay_started(self.number, total, reference)))
            .await
            .is_err()
        {
            return Ok(());
        }
        let (mut after, mut sent, mut previous) = (0, 0u64, None);
        // When the next event is due: advancing a schedule, rather than sleeping each gap,
        // keeps sub-millisecond gaps from adding up to timer granularity.
        let mut due = tokio::time::Instant::now();
        loop {
            let range = Range {
                after,
                up_to: None,
                from: Some(self.from),
                to: Some(self.to),
                limit: REPLAY_PAGE,
            };
            let page = crate::log::read(&client, &self.filter, &range).await?;
            let done = page.events.len() < REPLAY_PAGE;
            for ((id, envelope), at) in page.events.into_iter().zip(page.committed_at) {
                if let Some(previous) = previous {
                    due += replay_wait(previous, at, self.speed);
                    if due > tokio::time::Instant::now() {
                        tokio::time::sleep_until(due).await;
                    }
                }
                previous = Some(at);
                after = id;
                let frame = Frame::Replay { id, envelope: envelope.into(), replay: self.number };
                if push(frame).await.is_err() {
                    return Ok(());
                }
                sent += 1;
                if sent % REPLAY_PROGRESS_EVERY == 0 {
                    let _ =
                        push(Frame::Control(protocol::replay_progress(self.number, sent, total)))
                            .await;
                }
            }
            if done {
                break;
            }
        }
        let _ = push(Frame::Control(protocol::replay_progress(self.number, sent, total))).await;
        let _ = push(Frame::Control(protocol::replay_finished(self.number, sent))).await;
        Ok(())
    }
}

/// The wait before an event committed at `next`, after one committed at `previous`: their
/// original spacing divided by `speed`, at most `REPLAY_MAX_GAP`.
fn replay_wait(
    previous: std::time::SystemTime,
    next: std::time::SystemTime,
    speed: f64,
) -> std::time::Duration {
    let gap = next.duration_since(previous).unwrap_or_default();
    gap.div_f64(speed.clamp(f64::MIN_POSITIVE, 100.0)).min(REPLAY_MAX_GAP)
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

/// A token bucket for client frames. Frames beyond it are refused; refusals fill an abuse
/// meter that drains at the allowed rate, and a full meter (a client that keeps flooding)
/// ends the connection.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    abuse: f64,
    at: tokio::time::Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Limited,
    Abusive,
}

impl RateLimit {
    fn new(rate: u32, burst: u32) -> Self {
        let (rate, burst) = (f64::from(rate.max(1)), f64::from(burst.max(1)));
        Self { rate, burst, tokens: burst, abuse: 0.0, at: tokio::time::Instant::now() }
    }

    fn take(&mut self) -> Verdict {
        let now = tokio::time::Instant::now();
        let elapsed = (now - self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        // The meter drains at a tenth of the rate: a client that keeps sending faster than the
        // rate fills it sooner or later, however slightly faster.
        self.abuse = (self.abuse - elapsed * self.rate / 10.0).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        self.abuse += 1.0;
        if self.abuse > 2.0 * self.burst { Verdict::Abusive } else { Verdict::Limited }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_keep_spacing_divided_by_speed_and_cap_long_gaps() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(replay_wait(at(1000), at(1400), 4.0), Duration::from_millis(100));
        assert_eq!(replay_wait(at(1000), at(1400), 0.5), Duration::from_millis(800));
        assert_eq!(replay_wait(at(0), at(3_600_000), 2.0), REPLAY_MAX_GAP);
        // Commit times that go backwards (trigger mode's statement times) do not wait.
        assert_eq!(replay_wait(at(1400), at(1000), 1.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_refuses_then_closes_a_flood_but_not_a_burst() {
        let mut limit = RateLimit::new(10, 5);
        for _ in 0..5 {
            assert_eq!(limit.take(), Verdict::Allowed);
        }
        assert_eq!(limit.take(), Verdict::Limited);
        tokio::time::advance(std::time::Duration::from_millis(1000)).await;
        for _ in 0..5 {
            assert_eq!(limit.take(), Verdict::Allowed, "refilled");
        }
        let verdicts: Vec<Verdict> = (0..20).map(|_| limit.take()).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Limited).count(), 10);
        assert_eq!(verdicts.last(), Some(&Verdict::Abusive));
    }
}
