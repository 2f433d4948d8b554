//! Replay (SPEC §5): historic events of a time window, sent again with their original spacing
//! divided by `speed`, next to whatever else the connection receives.
//!
//! ```text
//!   history.count ──> replay_started {total}
//!   history.read (pages after the last id) ──> paced events tagged "replay_id"
//!                                          ──> replay_progress every 100, replay_finished
//! ```
//!
//! A replay is one task of its session; it pushes with [`Outbound::push_paced`], so a replay
//! never overflows the queue and live frames keep their room. Stopping it aborts the task.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::context::Context;
use super::protocol;
use crate::bus::mailbox::{Frame, Outbound};
use crate::filter::Filter;
use crate::log::{History, LogError, Range};

/// Events per replay read.
const REPLAY_PAGE: usize = 500;
/// The longest a replay waits between two events, however far apart they were.
const REPLAY_MAX_GAP: Duration = Duration::from_secs(3);
/// How often a replay reports progress, in events.
const REPLAY_PROGRESS_EVERY: u64 = 100;

/// One replay: historic events in `[from, to)`, paced like they happened, `speed` times faster.
pub(super) struct Replay<H> {
    /// Its place among the connection's running replays, given back before its last frame.
    pub(super) slot: tokio::sync::OwnedSemaphorePermit,
    pub(super) context: Arc<Context<H>>,
    pub(super) outbound: Arc<Outbound>,
    pub(super) number: u32,
    pub(super) filter: Filter,
    pub(super) from: SystemTime,
    pub(super) to: SystemTime,
    pub(super) speed: f64,
}

impl<H: History> Replay<H> {
    pub(super) async fn run(self, reference: Option<serde_json::Value>) {
        let last = match self.play(reference.as_ref()).await {
            Ok(Some(sent)) => protocol::replay_finished(self.number, sent),
            // The connection is closing.
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, "replay failed");
                protocol::replay_failed(self.number)
            }
        };
        // Free before the client hears it ended: one that starts its next replay on
        // `replay_finished` is never refused.
        let Replay { slot, outbound, .. } = self;
        drop(slot);
        let _ = outbound.push_paced(Frame::Control(last)).await;
    }

    /// Sends the replay up to its last progress report; how many events it sent, or `None`
    /// once the connection is closing.
    async fn play(&self, reference: Option<&serde_json::Value>) -> Result<Option<u64>, LogError> {
        let history = &self.context.history;
        let total = history.count(&self.filter, self.from, self.to).await?;
        let push = |frame| self.outbound.push_paced(frame);
        if push(Frame::Control(protocol::replay_started(self.number, total, reference)))
            .await
            .is_err()
        {
            return Ok(None);
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
            let page = history.read(&self.filter, &range).await?;
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
                    return Ok(None);
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
        Ok(Some(sent))
    }
}

/// The wait before an event committed at `next`, after one committed at `previous`: their
/// original spacing divided by `speed`, at most `REPLAY_MAX_GAP`.
fn replay_wait(previous: SystemTime, next: SystemTime, speed: f64) -> Duration {
    let gap = next.duration_since(previous).unwrap_or_default();
    gap.div_f64(speed.clamp(f64::MIN_POSITIVE, super::protocol::MAX_REPLAY_SPEED))
        .min(REPLAY_MAX_GAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_keep_spacing_divided_by_speed_and_cap_long_gaps() {
        use std::time::UNIX_EPOCH;
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(replay_wait(at(1000), at(1400), 4.0), Duration::from_millis(100));
        assert_eq!(replay_wait(at(1000), at(1400), 0.5), Duration::from_millis(800));
        assert_eq!(replay_wait(at(0), at(3_600_000), 2.0), REPLAY_MAX_GAP);
        // Commit times that go backwards (trigger mode's statement times) do not wait.
        assert_eq!(replay_wait(at(1400), at(1000), 1.0), Duration::ZERO);
    }
}
