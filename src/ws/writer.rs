//! The writing half of a connection: frames from the mailbox to the client, in order, in
//! batches, with keepalive pings and the close code that says why it ended.
//!
//! ```text
//!   Outbound ──next / try_next (up to WRITE_BATCH)──> sink.feed … sink.flush ──> client
//!       │                                       └─> Delivered (what the client was handed)
//!       └─ Closing ──> close frame (code, reason) ──> sink.close
//! ```
//!
//! A frame counts as delivered once the sink holds it: a close frame written later follows it,
//! so the 4008 reason can name an id the client may resume from with `since` and lose nothing.
//! A write stuck on a client that stopped reading is abandoned when the mailbox starts closing
//! for a reason that drops the queue (slow consumer, expired token); the close frame is still
//! tried, within `close_timeout`.

use std::collections::HashMap;
use std::pin::pin;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt};

use crate::bus::SubscriptionId;
use crate::bus::mailbox::{Closing, Frame, Next, Outbound};
use crate::config::ServerSettings;
use crate::metrics::Metrics;

/// Most frames written to one connection per flush.
const WRITE_BATCH: usize = 64;

/// Writes what `outbound` holds to `sink` until the connection closes; `welcome_id` is the
/// `last_id` the welcome announced, where delivery starts.
pub(super) async fn write_loop<W>(
    sink: W,
    outbound: &Outbound,
    limits: &ServerSettings,
    metrics: &Metrics,
    welcome_id: u64,
) where
    W: Sink<Message, Error = axum::Error>,
{
    let mut sink = pin!(sink);
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
                    if let Some((code, reason)) =
                        close_frame(&reason, &delivered, limits.max_frame_bytes)
                    {
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
        let delivered = &mut delivered;
        let write = async {
            for (message, frame) in batch {
                if let Some(message) = message {
                    sink.feed(message).await?;
                }
                // Delivered once the sink holds it: a close frame written later follows it.
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

/// The close code and reason for `reason`; `None` when the client is gone and nothing can be
/// said.
fn close_frame(
    reason: &Closing,
    delivered: &Delivered,
    max_frame_bytes: usize,
) -> Option<(u16, String)> {
    Some(match reason {
        Closing::SlowConsumer => {
            (4008, format!("slow consumer; last delivered id {}", delivered.resume_from()))
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
        let subscriptions = vec![subscription];
        Frame::Event { id, envelope, subscriptions, history, committed_at: 0, text: None }
    }

    #[test]
    fn the_resume_id_is_the_least_a_subscription_has_been_handed() {
        let mut delivered = Delivered { live: 10, catching_up: HashMap::new() };
        delivered.note(&event(11, 1, false));
        assert_eq!(delivered.resume_from(), 11);
        // s2 catches up from 3: until it is live, its history bounds what may be resumed.
        delivered.note(&Frame::CatchingUp { subscription: 2, from: 3 });
        delivered.note(&event(12, 1, false));
        assert_eq!(delivered.resume_from(), 3);
        delivered.note(&event(5, 2, true));
        assert_eq!(delivered.resume_from(), 5);
        delivered.note(&Frame::Live { subscription: 2 });
        assert_eq!(delivered.resume_from(), 12);
    }

    #[test]
    fn every_closing_but_gone_has_a_code_and_a_reason() {
        let delivered = Delivered { live: 7, catching_up: HashMap::new() };
        let close = |reason| close_frame(&reason, &delivered, 1024);
        assert_eq!(
            close(Closing::SlowConsumer),
            Some((4008, "slow consumer; last delivered id 7".into()))
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
