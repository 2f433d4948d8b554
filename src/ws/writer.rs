//! The writing half of a connection: frames from the mailbox to the client, in order, in
//! batches, with keepalive pings, and the close code that says why it ended.
//!
//! ```text
//!   Outbound ──next / try_next (up to WRITE_BATCH)──> sink.feed … sink.flush ──> client
//!       │                                       └─> Delivered (what the client was handed)
//!       └─ Closing ──> close frame (code, reason) within close_timeout, or no frame at all
//! ```
//!
//! A frame counts as delivered once the sink holds it: a close frame written later follows it,
//! so the 4008 reason can name an id the client may resume from with `since` and lose nothing.
//!
//! Falling behind is not a reason to close (the bus has the connection catch up from the log);
//! the writer closes a slow consumer with 4008 in two cases only: what it just handed over
//! was committed more than `max_lag` before the newest event published (it is not catching
//! up), or the sink accepted nothing for `write_timeout` (nobody reads). A stuck write is
//! abandoned then; the close frame goes after what the socket already holds, within
//! `close_timeout`. If it cannot be written in that time the connection is dropped without
//! one: a close frame without a code (what closing the sink would send) never goes out.

use std::collections::HashMap;
use std::pin::pin;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt};

use super::protocol;
use crate::bus::mailbox::{Closing, Frame, Next, Notice, Outbound, Slow};
use crate::bus::{Bus, SubscriptionId};
use crate::config::ServerSettings;
use crate::metrics::Metrics;

/// Most frames written to one connection per flush.
const WRITE_BATCH: usize = 64;

/// How the writing ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// A close frame with this code was written: the client may still answer it.
    CloseSent(u16),
    /// Nothing more could be said (the client left, or its socket took no close frame).
    Dropped,
}

/// What the writer needs besides the socket and the mailbox.
pub(super) struct Writer<'a> {
    pub(super) outbound: &'a Outbound,
    pub(super) limits: &'a ServerSettings,
    pub(super) metrics: &'a Metrics,
    /// For the newest commit time (how far behind the client is) and slow-consumer counts.
    pub(super) bus: &'a Bus,
    /// The `last_id` the welcome announced, where delivery starts.
    pub(super) welcome_id: u64,
}

enum WriteError {
    /// The sink accepted nothing for `write_timeout`.
    Stalled,
    /// The socket failed.
    Failed,
}

impl Writer<'_> {
    /// Writes what the mailbox holds to `sink` until the connection closes.
    pub(super) async fn run<W>(self, sink: W) -> Ended
    where
        W: Sink<Message, Error = axum::Error>,
    {
        let Writer { outbound, limits, metrics, .. } = self;
        let mut sink = pin!(sink);
        let mut delivered = Delivered::new(self.welcome_id);
        let start = tokio::time::Instant::now() + limits.ping_interval;
        let mut ping = tokio::time::interval_at(start, limits.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message: (Message, Option<Frame>) = tokio::select! {
                next = outbound.next() => match next {
                    Next::Frame(frame) => match text(&frame) {
                        Some(text) => (Message::Text(utf8(text)), Some(frame)),
                        None => {
                            // Markers only move the delivery position.
                            delivered.note(&frame);
                            continue;
                        }
                    },
                    Next::Close(reason) => return self.close(sink, &reason, &delivered).await,
                },
                _ = ping.tick() => (Message::Ping(Default::default()), None),
            };
            // Whatever else is already queued goes in the same write: one syscall for a burst.
            let (first, frame) = message;
            let mut batch: Vec<(Option<Message>, Option<Frame>)> = vec![(Some(first), frame)];
            while batch.len() < WRITE_BATCH {
                let Some(frame) = outbound.try_next() else { break };
                batch.push((text(&frame).map(|text| Message::Text(utf8(text))), Some(frame)));
            }
            let handed_at = delivered.at;
            let delivered = &mut delivered;
            let mut sink = sink.as_mut();
            let write = async {
                let mut live = Vec::with_capacity(batch.len());
                for (message, frame) in batch {
                    if let Some(message) = message {
                        ready(limits.write_timeout, sink.as_mut()).await?;
                        sink.as_mut().start_send(message).map_err(|_| WriteError::Failed)?;
                    }
                    // Delivered once the sink holds it: a close frame written later follows it.
                    if let Some(frame) = frame {
                        delivered.note(&frame);
                        if let Frame::Event { history: false, committed_at, .. } = &frame {
                            live.push(*committed_at);
                        }
                    }
                }
                patiently(limits.write_timeout, sink.flush()).await?;
                // Written: one clock reading for the batch.
                let now = crate::model::Timestamp::now().0;
                for committed_at in live {
                    metrics.sent(now - committed_at);
                }
                Ok(())
            };
            tokio::select! {
                sent = write => match sent {
                    Ok(()) => {}
                    Err(WriteError::Stalled) => {
                        self.close_slow(Slow::Stalled(limits.write_timeout));
                    }
                    Err(WriteError::Failed) => {
                        outbound.close(Closing::Gone);
                        return Ended::Dropped;
                    }
                },
                // Closing for a reason that drops the queue (an expired token): the close
                // frame follows what was already handed to the socket.
                () = outbound.interrupted() => {}
            }
            if delivered.at != handed_at
                && let Some(at) = delivered.at
                && self.bus.newest_commit().saturating_sub(at) > micros(limits.max_lag)
            {
                self.close_slow(Slow::Behind(limits.max_lag));
            }
        }
    }

    fn close_slow(&self, why: Slow) {
        if self.outbound.close(Closing::SlowConsumer(why)) {
            self.bus.slow_consumer_closed();
            tracing::info!(?why, "closing slow consumer");
        }
    }

    /// Says why the connection ends, after what the socket already holds and within
    /// `close_timeout`, or drops it without a word.
    async fn close<W>(
        &self,
        mut sink: std::pin::Pin<&mut W>,
        reason: &Closing,
        delivered: &Delivered,
    ) -> Ended
    where
        W: Sink<Message, Error = axum::Error>,
    {
        let limits = self.limits;
        let Some((code, reason)) = close_frame(reason, delivered, limits.max_frame_bytes) else {
            // The client left: only the echo of its close frame may be pending.
            let _ = tokio::time::timeout(limits.close_timeout, sink.flush()).await;
            return Ended::Dropped;
        };
        // `send` waits for the socket to take what it held before, then the close frame.
        // Not `sink.close()`: if our frame never got in, it would send a close without a code.
        let frame = CloseFrame { code, reason: reason.into() };
        let sent =
            tokio::time::timeout(limits.close_timeout, sink.send(Message::Close(Some(frame))));
        match sent.await {
            Ok(Ok(())) => Ended::CloseSent(code),
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(
                    code,
                    "no room for the close frame in time; dropping the connection"
                );
                Ended::Dropped
            }
        }
    }
}

/// Until the sink takes another message: at once when it has room, which is the common case
/// and needs no timer; otherwise within `limit`.
async fn ready<W>(limit: Duration, mut sink: std::pin::Pin<&mut W>) -> Result<(), WriteError>
where
    W: Sink<Message, Error = axum::Error>,
{
    let mut room = std::future::poll_fn(|cx| sink.as_mut().poll_ready(cx));
    match futures_util::FutureExt::now_or_never(&mut room) {
        Some(Ok(())) => Ok(()),
        Some(Err(_)) => Err(WriteError::Failed),
        None => patiently(limit, room).await,
    }
}

/// A sink operation that must make progress within `limit`.
async fn patiently(
    limit: Duration,
    operation: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), WriteError> {
    match tokio::time::timeout(limit, operation).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteError::Failed),
        Err(_) => Err(WriteError::Stalled),
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The text a frame sends: its own, or what a marker announces (`lagging`, `caught_up`).
fn text(frame: &Frame) -> Option<bytes::Bytes> {
    match *frame {
        Frame::CatchingUp { subscription, from, lagging: true } => {
            Some(protocol::lagging(subscription, from).into())
        }
        Frame::Live { subscription, caught_up: Some(last_id) }
        | Frame::Notice(Notice::CaughtUp { subscription, last_id }) => {
            Some(protocol::caught_up(subscription, last_id).into())
        }
        Frame::Notice(Notice::Reset { subscription, reason, oldest }) => {
            Some(protocol::reset(subscription, reason, oldest).into())
        }
        _ => frame.message(),
    }
}

/// The close code and reason for `reason`; `None` when the client is gone and nothing can be
/// said.
fn close_frame(
    reason: &Closing,
    delivered: &Delivered,
    max_frame_bytes: usize,
) -> Option<(u16, String)> {
    Some(match reason {
        Closing::SlowConsumer(why) => {
            let why = match why {
                Slow::Behind(limit) => {
                    format!("more than {} behind", humantime::format_duration(*limit))
                }
                Slow::Stalled(limit) => {
                    format!("nothing read for {}", humantime::format_duration(*limit))
                }
            };
            (4008, format!("slow consumer, {why}; last delivered id {}", delivered.resume_from()))
        }
        Closing::Shutdown => (1001, "server shutting down".to_owned()),
        Closing::FrameTooLarge => {
            (1009, format!("frame too large (limit {max_frame_bytes} bytes)"))
        }
        Closing::Idle => (1000, "idle timeout".to_owned()),
        Closing::TokenExpired => (4001, "token expired".to_owned()),
        Closing::RateLimited => (1008, "rate limit exceeded".to_owned()),
        Closing::BadFrame { code, reason } => (*code, (*reason).to_owned()),
        Closing::Gone => return None,
    })
}

/// Where a connection's delivery stands: for the 4008 reason, an id such that everything up
/// to it that any subscription should get has been handed to the socket; for the lag, the
/// commit time of the last event handed over that counts.
struct Delivered {
    /// Every live subscription has been handed everything up to this id: the last live event
    /// written (the welcome's `last_id` before any). `None` while the connection lags, when
    /// no subscription is live.
    live: Option<u64>,
    /// Catching-up subscriptions and the last history event written for each.
    catching_up: HashMap<SubscriptionId, u64>,
    /// The highest id noted: what may be resumed from when there is no subscription at all.
    seen: u64,
    /// Commit time (µs) of the last event written that counts towards the lag.
    at: Option<i64>,
}

impl Delivered {
    fn new(welcome_id: u64) -> Self {
        Self { live: Some(welcome_id), catching_up: HashMap::new(), seen: welcome_id, at: None }
    }

    fn note(&mut self, frame: &Frame) {
        match frame {
            Frame::Event { id, subscriptions, history, committed_at, .. } => {
                self.seen = self.seen.max(*id);
                if *committed_at > 0 {
                    self.at = Some(*committed_at);
                }
                if !history {
                    self.live = Some(*id);
                    return;
                }
                for subscription in subscriptions.iter() {
                    if let Some(at) = self.catching_up.get_mut(subscription) {
                        *at = (*at).max(*id);
                    }
                }
            }
            Frame::CatchingUp { subscription, from, lagging } => {
                self.seen = self.seen.max(*from);
                self.catching_up.insert(*subscription, *from);
                if *lagging {
                    // The connection fell behind: each live subscription catches up from `from`
                    // now (the bus queued all their markers at once), none is live.
                    self.live = None;
                }
            }
            Frame::Live { subscription, caught_up } => {
                self.catching_up.remove(subscription);
                if let Some(last_id) = *caught_up {
                    // A lag ended: its members, all the live subscriptions there are, have
                    // everything up to there.
                    self.seen = self.seen.max(last_id);
                    self.live = Some(self.live.map_or(last_id, |live| live.max(last_id)));
                }
            }
            Frame::Control(_) | Frame::Replay { .. } | Frame::Notice(_) => {}
        }
    }

    fn resume_from(&self) -> u64 {
        let catching_up = self.catching_up.values().copied().min();
        match (self.live, catching_up) {
            (Some(live), Some(least)) => live.min(least),
            (Some(id), None) | (None, Some(id)) => id,
            (None, None) => self.seen,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64, subscription: u32, history: bool) -> Frame {
        let envelope = format!(r#"{{"id":{id}}}"#).into();
        let subscriptions = std::sync::Arc::from([subscription]);
        Frame::Event { id, envelope, subscriptions, history, committed_at: 0, text: None }
    }

    #[test]
    fn the_resume_id_is_the_least_a_subscription_has_been_handed() {
        let mut delivered = Delivered::new(10);
        delivered.note(&event(11, 1, false));
        assert_eq!(delivered.resume_from(), 11);
        // s2 catches up from 3: until it is live, its history bounds what may be resumed.
        delivered.note(&Frame::CatchingUp { subscription: 2, from: 3, lagging: false });
        delivered.note(&event(12, 1, false));
        assert_eq!(delivered.resume_from(), 3);
        delivered.note(&event(5, 2, true));
        assert_eq!(delivered.resume_from(), 5);
        delivered.note(&Frame::Live { subscription: 2, caught_up: None });
        assert_eq!(delivered.resume_from(), 12);
        // The connection fell behind at 15 (13 and 14 did not match): s1 catches up from 14.
        delivered.note(&Frame::CatchingUp { subscription: 1, from: 14, lagging: true });
        assert_eq!(delivered.resume_from(), 14);
        delivered.note(&event(15, 1, true));
        assert_eq!(delivered.resume_from(), 15, "no live subscription holds it back");
        // A subscription made meanwhile joins the lag at the head.
        delivered.note(&Frame::CatchingUp { subscription: 3, from: 30, lagging: true });
        delivered.note(&event(16, 1, true));
        assert_eq!(delivered.resume_from(), 16);
        delivered.note(&Frame::Live { subscription: 3, caught_up: Some(20) });
        delivered.note(&Frame::Live { subscription: 1, caught_up: Some(20) });
        assert_eq!(delivered.resume_from(), 20, "caught up to 20");
        assert_eq!(delivered.at, None, "nothing counted towards the lag yet");
    }

    #[test]
    fn markers_of_a_lag_are_told_to_the_client() {
        let told = |frame: Frame| text(&frame).map(|t| String::from_utf8_lossy(&t).into_owned());
        assert_eq!(
            told(Frame::CatchingUp { subscription: 2, from: 7, lagging: true }).as_deref(),
            Some(r#"{"type":"lagging","subscription_id":"s2","last_id":7}"#)
        );
        assert_eq!(told(Frame::CatchingUp { subscription: 2, from: 7, lagging: false }), None);
        assert_eq!(
            told(Frame::Live { subscription: 2, caught_up: Some(9) }).as_deref(),
            Some(r#"{"type":"caught_up","subscription_id":"s2","last_id":9}"#)
        );
        assert_eq!(told(Frame::Live { subscription: 2, caught_up: None }), None);
    }

    #[test]
    fn every_closing_but_gone_has_a_code_and_a_reason() {
        let delivered = Delivered::new(7);
        let close = |reason| close_frame(&reason, &delivered, 1024);
        assert_eq!(
            close(Closing::SlowConsumer(Slow::Behind(Duration::from_secs(300)))),
            Some((4008, "slow consumer, more than 5m behind; last delivered id 7".into()))
        );
        assert_eq!(
            close(Closing::SlowConsumer(Slow::Stalled(Duration::from_secs(30)))),
            Some((4008, "slow consumer, nothing read for 30s; last delivered id 7".into()))
        );
        assert_eq!(
            close(Closing::FrameTooLarge),
            Some((1009, "frame too large (limit 1024 bytes)".into()))
        );
        assert_eq!(close(Closing::Shutdown).map(|c| c.0), Some(1001));
        assert_eq!(close(Closing::Idle).map(|c| c.0), Some(1000));
        assert_eq!(close(Closing::TokenExpired).map(|c| c.0), Some(4001));
        assert_eq!(close(Closing::RateLimited).map(|c| c.0), Some(1008));
        assert_eq!(close(Closing::BadFrame { code: 1007, reason: "x" }), Some((1007, "x".into())));
        assert_eq!(close(Closing::Gone), None);
    }
}
