//! `COPY (SUBSCRIBE TO events WHERE ... [SINCE n]) TO STDOUT`: one subscription on the bus,
//! delivered as COPY rows, the way a WebSocket connection's is delivered as frames.
//!
//! ```text
//!   bus.connect(mailbox) + bus.subscribe(filter, since) ── last_id N
//!   catch_up (since): history (since, N] from the log ──┐
//!   bus.publish: live events after N ───────────────────┼─> Outbound (bounded) ─> CopyData rows
//!   lag catch-up, when the mailbox overflowed ──────────┘
//! ```
//!
//! The guarantees are the WebSocket ones (SPEC §5): every matching event after the cursor,
//! once, in id order, from the same bus, mailbox and catch-ups (`bus::catch_up`, `bus::lag`).
//! A client that falls behind is not dropped: the bus stops offering it live events and it
//! catches up from the log. It is ended only when what it was just sent was committed more
//! than `--max-lag` before the newest event (an error, 53400, naming the id to resume from),
//! or when its socket accepts nothing for `--write-timeout` (the connection is dropped).
//! Whatever ends a subscription, the id in the message is one it may pass as `SINCE` to lose
//! nothing: the last event sent (or the cursor it started from).
//!
//! A quiet subscription writes a `ParameterStatus` `rowcast.resume_id` every `--ping-interval`
//! (drivers take those at any time): the id to resume from, and a write that finds a client
//! that went away (see `peer.rs`).
//!
//! A subscription ends when the client goes away (it cancels, closes or drops the socket),
//! when its token expires (FATAL 28000), when the server shuts down (FATAL 57P01) or when the
//! log no longer holds its cursor (55000): it never goes silently past a gap.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use pgwire::error::PgWireError;
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyOutResponse};
use pgwire::messages::startup::ParameterStatus;
use tokio::task::JoinHandle;

use super::peer::Peer;
use super::sql::Severities;
use super::{Context, error, fatal, rows, token_expired};
use crate::auth::Scope;
use crate::bus::catch_up::{CatchUp, Start};
use crate::bus::lag::LagCatchUp;
use crate::bus::mailbox::{Closing, Frame, Next, Notice, Outbound, Slow};
use crate::bus::{Bus, ConnectionId};
use crate::filter::Filter;
use crate::model::Severity;

/// Most rows written before a flush.
const WRITE_BATCH: usize = 64;
/// A connection's one subscription.
const SUBSCRIPTION: u32 = 1;

/// A subscription, its filter confined to the connection's scope.
pub struct Subscription {
    pub filter: Filter,
    pub severities: Severities,
    pub since: Option<u64>,
    /// What the connection's token grants: the subscription ends when it expires.
    pub token: Scope,
}

/// What ends a subscription's delivery.
enum End {
    /// Said to the client as this error (after the rows sent so far).
    Error(PgWireError),
    /// Nothing can be said: the client left or its socket takes nothing.
    Dropped,
}

/// The bus connection of a subscription, let go of however the subscription ends (a cancel
/// drops the future that holds it).
struct Registration {
    bus: Arc<Bus>,
    connection: ConnectionId,
    outbound: Arc<Outbound>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.outbound.close(Closing::Gone);
        self.bus.disconnect(self.connection);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Streams `subscription` to `client` until it ends; returns the error that ends it. The
/// caller sends it (the rows went out in COPY mode, which an error ends) unless the peer is
/// abandoned, in which case the connection is dropped without a word.
pub async fn run<C>(
    client: &mut C,
    context: &Arc<Context>,
    peer: &Peer,
    subscription: Subscription,
) -> PgWireError
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    PgWireError: From<C::Error>,
{
    match deliver(client, context, peer, subscription).await {
        End::Error(err) => err,
        End::Dropped => {
            peer.abandon();
            error("08006", "the client went away")
        }
    }
}

async fn deliver<C>(
    client: &mut C,
    context: &Arc<Context>,
    peer: &Peer,
    subscription: Subscription,
) -> End
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    PgWireError: From<C::Error>,
{
    let limits = &context.limits;
    let outbound = Outbound::new(limits.outbound_bytes);
    let (connection, _) = context.bus.connect(outbound.clone());
    let mut registration = Registration {
        bus: context.bus.clone(),
        connection,
        outbound: outbound.clone(),
        tasks: Vec::new(),
    };
    let filter = Arc::new(subscription.filter);
    let since = subscription.since;
    if let Some(since) = since {
        // A cursor from a gateway ahead of this one (SPEC §10): wait for it rather than reset.
        context.bus.wait_for_head(since, limits.cursor_ahead_wait).await;
    }
    // The bus queues a reply for WebSocket clients; COPY has nothing to say there.
    let subscribed =
        context.bus.subscribe(connection, SUBSCRIPTION, filter.clone(), since, |_| String::new());
    let Ok(last_id) = subscribed else {
        return End::Error(shutting_down(since.unwrap_or(0)));
    };
    if let Some(since) = since {
        let catch_up = CatchUp {
            sources: context.clone(),
            connection,
            subscription: SUBSCRIPTION,
            filter,
            outbound: outbound.clone(),
        };
        registration.tasks.push(tokio::spawn(catch_up.run(Start::Since(since), last_id)));
    }
    let header = CopyOutResponse::new(0, 1, vec![0]);
    if write(client, limits.write_timeout, PgWireBackendMessage::CopyOutResponse(header), true)
        .await
        .is_err()
    {
        return End::Dropped;
    }
    let mut delivery = Delivery {
        resume: since.unwrap_or(last_id),
        at: None,
        severities: subscription.severities,
    };
    let progress = Arc::new(AtomicU64::new(0));
    // Made once: the peek's timer runs on under steady traffic, and the expiry is one timer.
    let gone = peer.gone();
    let expired = subscription.token.expired();
    tokio::pin!(gone, expired);
    loop {
        let first = tokio::select! {
            next = outbound.next() => next,
            () = outbound.behind() => {
                if context.bus.claim_lag(connection) {
                    progress.store(0, Ordering::Relaxed);
                    let catch_up = LagCatchUp {
                        sources: context.clone(),
                        connection,
                        outbound: outbound.clone(),
                        progress: progress.clone(),
                    };
                    registration.tasks.retain(|task| !task.is_finished());
                    registration.tasks.push(tokio::spawn(catch_up.run()));
                }
                continue;
            }
            () = &mut gone => return End::Dropped,
            () = tokio::time::sleep(limits.ping_interval) => {
                // A quiet subscription says where it is: a write is what finds a client gone.
                let status = ParameterStatus::new("rowcast.resume_id".into(), delivery.resume.to_string());
                let ping = PgWireBackendMessage::ParameterStatus(status);
                if write(client, limits.write_timeout, ping, true).await.is_err() {
                    return End::Dropped;
                }
                continue;
            }
            () = &mut expired => {
                return End::Error(token_expired());
            }
        };
        let mut next = Some(first);
        let mut written = 0;
        let handed_at = delivery.at;
        while let Some(item) = next.take() {
            let frame = match item {
                Next::Frame(frame) => frame,
                Next::Close(reason) => return delivery.closed(&reason),
            };
            match delivery.row(frame) {
                Ok(Some(line)) => {
                    let data = PgWireBackendMessage::CopyData(CopyData::new(line));
                    if write(client, limits.write_timeout, data, false).await.is_err() {
                        return End::Dropped;
                    }
                    written += 1;
                }
                Ok(None) => {}
                Err(end) => return end,
            }
            if written < WRITE_BATCH {
                next = outbound.try_next().map(Next::Frame);
            }
        }
        if written > 0 && flush(client, limits.write_timeout).await.is_err() {
            // Nothing read for `write_timeout`: what WebSocket closes with 4008 (stalled).
            context.bus.slow_consumer_closed();
            tracing::info!(
                connection,
                "dropping a postgres-protocol subscriber that reads nothing"
            );
            return End::Dropped;
        }
        let newest = context.bus.newest_commit();
        if delivery.at != handed_at
            && let Some(at) = delivery.at
            && newest.saturating_sub(at) > micros(limits.max_lag)
        {
            context.bus.slow_consumer_closed();
            return End::Error(delivery.slow(Slow::Behind(limits.max_lag)));
        }
    }
}

/// Where a subscription's delivery stands.
struct Delivery {
    /// The cursor that loses nothing: every matching event up to it was written.
    resume: u64,
    /// Commit time (µs) of the last event written that counts towards the lag.
    at: Option<i64>,
    severities: Severities,
}

impl Delivery {
    /// The row a frame becomes, if any; an error for a gap in the log.
    fn row(&mut self, frame: Frame) -> Result<Option<Bytes>, End> {
        match frame {
            Frame::Event { id, envelope, committed_at, .. } => {
                self.resume = self.resume.max(id);
                if committed_at > 0 {
                    self.at = Some(committed_at);
                }
                if !self.severities.is_minimum() && !self.allows(&envelope) {
                    return Ok(None);
                }
                Ok(Some(Bytes::from(rows::copy_line(&envelope))))
            }
            Frame::Notice(Notice::CaughtUp { last_id, .. })
            | Frame::Live { caught_up: Some(last_id), .. } => {
                self.resume = self.resume.max(last_id);
                Ok(None)
            }
            Frame::Notice(Notice::Reset { reason, oldest, .. }) => {
                let message = if reason == "cursor_ahead" {
                    format!(
                        "SINCE {} is past the end of this event log (its last id is {}): is this the log the id came from?",
                        self.resume,
                        oldest.saturating_sub(1)
                    )
                } else {
                    format!(
                        "events after {} are no longer in the log (retention); it starts at id {oldest}: subscribe with SINCE {} to go on from there",
                        self.resume,
                        oldest.saturating_sub(1)
                    )
                };
                Err(End::Error(error("55000", message)))
            }
            Frame::Live { .. }
            | Frame::CatchingUp { .. }
            | Frame::Control(_)
            | Frame::Replay { .. } => Ok(None),
        }
    }

    fn allows(&self, envelope: &str) -> bool {
        #[derive(serde::Deserialize)]
        struct Only {
            severity: Severity,
        }
        serde_json::from_str::<Only>(envelope).is_ok_and(|e| self.severities.allows(e.severity))
    }

    /// Only the bus closes a subscription's mailbox from outside (at shutdown); slowness and
    /// an expired token are noticed by `deliver` itself, which ends with their errors.
    fn closed(&self, reason: &Closing) -> End {
        match reason {
            Closing::Shutdown => End::Error(shutting_down(self.resume)),
            _ => End::Dropped,
        }
    }

    fn slow(&self, why: Slow) -> PgWireError {
        let why = match why {
            Slow::Behind(limit) => {
                format!("more than {} behind", humantime::format_duration(limit))
            }
            Slow::Stalled(limit) => {
                format!("nothing read for {}", humantime::format_duration(limit))
            }
        };
        error(
            "53400",
            format!(
                "slow consumer, {why}; last delivered id {0}: resume with SINCE {0}",
                self.resume
            ),
        )
    }
}

fn shutting_down(resume: u64) -> PgWireError {
    fatal(
        "57P01",
        format!("rowcast is shutting down; last delivered id {resume}: resume with SINCE {resume}"),
    )
}

/// Sends `message` (flushing when `flush`), within `limit`.
async fn write<C>(
    client: &mut C,
    limit: Duration,
    message: PgWireBackendMessage,
    flush: bool,
) -> Result<(), ()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
{
    let sent = async {
        client.feed(message).await?;
        if flush { client.flush().await } else { Ok(()) }
    };
    match tokio::time::timeout(limit, sent).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

async fn flush<C>(client: &mut C, limit: Duration) -> Result<(), ()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
{
    match tokio::time::timeout(limit, client.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
