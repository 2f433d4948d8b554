//! The publisher's side: every appended event to the stream, in id order, message id = event
//! id, each acknowledged by the stream before the next chunk goes.
//!
//! The log writer never waits for NATS: [`Outlet::offer`] hands a committed batch over or, when
//! the relay is that far behind, drops it. The relay follows the publisher's head (its watch)
//! and publishes everything up to it: from the batches it was handed when they continue where
//! it stands, otherwise from the log. So a dropped batch, a NATS outage and a takeover are all
//! the same case: the relay asks the stream for the id of its last message and publishes from
//! the log what comes after it. A republish that the stream already has is dropped by its
//! duplicate window; one older than that reaches gateways, which skip ids they delivered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{NatsError, Status, connect, context, ensure_stream, last_id, message};
use crate::backoff::Backoff;
use crate::config::NatsSettings;
use crate::log::{self, StoredEvent};
use crate::pg::Pool;

/// Committed batches waiting for the relay; more are dropped and read back from the log.
const OUTLET_BATCHES: usize = 1024;
/// Events the relay keeps in memory at most (those batches, unpublished).
const MAX_QUEUED: usize = 100_000;
/// Events sent before their acknowledgements are awaited.
const CHUNK: usize = 512;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a stopping relay may take to publish what the publisher appended last.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long, after that, what was published may take to leave the client's buffer.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// Where the publisher hands committed events to the relay; never waits.
#[derive(Clone)]
pub struct Outlet {
    batches: mpsc::Sender<Vec<StoredEvent>>,
}

impl Outlet {
    pub fn offer(&self, events: &[StoredEvent]) {
        if !events.is_empty() {
            // Full: the relay reads them from the log instead (the head tells it how far).
            let _ = self.batches.try_send(events.to_vec());
        }
    }
}

/// Publishes a publisher's appended events to the stream; see the module doc.
pub struct Relay {
    settings: NatsSettings,
    batches: mpsc::Receiver<Vec<StoredEvent>>,
    log: Pool,
    /// The id of the newest event in the log, as this publisher committed it (0 while it
    /// waits for the log's lock: a standby publishes nothing).
    head: watch::Receiver<u64>,
    status: Arc<Status>,
}

/// A relay that publishes up to `head`, reading the log through `log`, and its outlet.
pub fn relay(
    settings: NatsSettings,
    log: Pool,
    head: watch::Receiver<u64>,
    status: Arc<Status>,
) -> (Outlet, Relay) {
    let (tx, batches) = mpsc::channel(OUTLET_BATCHES);
    (Outlet { batches: tx }, Relay { settings, batches, log, head, status })
}

/// What the stream has and what waits to go there.
#[derive(Default)]
struct Progress {
    /// The last id the stream acknowledged; `None` until asked (again, after an error).
    published: Option<u64>,
    /// Batches handed over and not published, in id order (not always contiguous).
    queue: VecDeque<StoredEvent>,
}

impl Progress {
    fn has_work(&self, head: u64) -> bool {
        match self.published {
            None => !self.queue.is_empty() || head > 0,
            Some(published) => {
                head > published || self.queue.back().is_some_and(|e| e.id > published)
            }
        }
    }

    fn take(&mut self, batch: Vec<StoredEvent>) {
        if self.queue.len() + batch.len() <= MAX_QUEUED {
            self.queue.extend(batch);
        }
    }
}

impl Relay {
    /// Publishes until `shutdown`, then what the publisher appended before it stopped (the
    /// server stops the publisher first), within [`SHUTDOWN_GRACE`].
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), NatsError> {
        let client = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            client = connect(&self.settings, "rowcast publisher", self.status.clone()) => client?,
        };
        let js = context(client.clone());
        let mut progress = Progress::default();
        let mut stream = None;
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        self.status.running();
        loop {
            if !progress.has_work(*self.head.borrow()) {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    Some(batch) = self.batches.recv() => progress.take(batch),
                    Ok(()) = self.head.changed() => {}
                }
            }
            while let Ok(batch) = self.batches.try_recv() {
                progress.take(batch);
            }
            let head = *self.head.borrow_and_update();
            match self.step(&js, &mut stream, &mut progress, head).await {
                Ok(()) => {
                    self.status.running();
                    backoff.reset();
                }
                Err(err) => {
                    self.status.failed(&err);
                    if !err.is_retryable() {
                        tracing::error!(error = %err, "publishing to NATS stopped");
                        return Err(err);
                    }
                    // Some of what was sent may be in the stream: ask it again.
                    progress.published = None;
                    stream = None;
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "publishing to NATS interrupted");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let finish = async {
            while let Ok(batch) = self.batches.try_recv() {
                progress.take(batch);
            }
            let head = *self.head.borrow();
            while progress.has_work(head) {
                if let Err(err) = self.step(&js, &mut stream, &mut progress, head).await {
                    tracing::warn!(error = %err, "publishing to NATS at shutdown failed; the next publisher publishes the rest");
                    break;
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, finish).await.is_err() {
            tracing::warn!(
                "publishing to NATS at shutdown timed out; the next publisher publishes the rest"
            );
        }
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, client.flush()).await;
        Ok(())
    }

    /// Publishes the next chunk after what the stream has, up to `head`.
    async fn step(
        &self,
        js: &jetstream::Context,
        stream: &mut Option<stream::Stream>,
        progress: &mut Progress,
        head: u64,
    ) -> Result<(), NatsError> {
        let stream = match stream {
            Some(stream) => stream,
            None => stream.insert(ensure_stream(js, &self.settings).await?),
        };
        let handed = progress.queue.back().map_or(head, |e| e.id.max(head));
        let (mut published, asked) = match progress.published {
            Some(published) => (published, false),
            None => {
                // With nothing in the stream there is nothing to resume: start from what
                // comes now (gateways read anything older from the log).
                let baseline = progress.queue.front().map_or(head, |e| e.id - 1);
                let from = match last_id(stream).await? {
                    Some(last) if last > handed => {
                        tracing::error!(
                            stream_last_id = last,
                            log_head = handed,
                            "the stream holds ids this log never gave: it belongs to another log; publishing from the log's head"
                        );
                        baseline
                    }
                    Some(last) => last,
                    None => baseline,
                };
                tracing::info!(after = from, "publishing to the NATS stream");
                (*progress.published.insert(from), true)
            }
        };
        let from_log = progress.queue.front().is_none_or(|e| e.id != published + 1);
        if from_log && handed > published && !asked {
            // Another publisher may have published these while this one had lost the lock:
            // the stream says how far, before anything is read from the log.
            if let Some(last) = last_id(stream).await?
                && last > published
                && last <= handed
            {
                published = last;
                progress.published = Some(last);
            }
        }
        while progress.queue.front().is_some_and(|e| e.id <= published) {
            progress.queue.pop_front();
        }
        let next = published + 1;
        let chunk: Vec<StoredEvent> = match progress.queue.front() {
            Some(front) if front.id == next => {
                let mut chunk = Vec::with_capacity(CHUNK.min(progress.queue.len()));
                while chunk.len() < CHUNK
                    && progress.queue.front().is_some_and(|e| e.id == next + chunk.len() as u64)
                {
                    chunk.extend(progress.queue.pop_front());
                }
                chunk
            }
            front => {
                let up_to = front.map_or(head, |e| e.id - 1);
                if up_to < next {
                    return Ok(());
                }
                let client = self.log.get().await?;
                let (_, events) = log::read_stored(&client, published, Some(up_to), CHUNK).await?;
                if events.is_empty() {
                    // Gone to retention: nothing to publish up to there.
                    progress.published = Some(up_to);
                    return Ok(());
                }
                events
            }
        };
        self.publish(js, &chunk).await?;
        progress.published = chunk.last().map(|e| e.id);
        Ok(())
    }

    /// Sends `chunk` in order, then waits for every acknowledgement.
    async fn publish(
        &self,
        js: &jetstream::Context,
        chunk: &[StoredEvent],
    ) -> Result<(), NatsError> {
        let failed = |err: &dyn std::fmt::Display| NatsError::Publish(err.to_string());
        let mut acks = Vec::with_capacity(chunk.len());
        for event in chunk {
            let subject = message::subject(&self.settings.subject_prefix, event);
            let payload = Bytes::from_owner(Envelope(event.json.clone()));
            let publish = PublishMessage::build().payload(payload).message_id(event.id.to_string());
            match js.send_publish(subject, publish).await {
                Ok(ack) => acks.push(ack),
                Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    // Too big for this NATS server: gateways read it from the log, as a gap.
                    tracing::warn!(id = event.id, error = %err, "event too large for NATS; gateways read it from the log");
                }
                Err(err) => return Err(failed(&err)),
            }
        }
        for ack in acks {
            ack.await.map_err(|err| failed(&err))?;
        }
        let status = &self.status;
        status.published.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if let Some(last) = chunk.last() {
            status.published_id.store(last.id, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// An event's envelope as a message payload: the stored text itself, not a copy of it.
struct Envelope(Arc<str>);

impl AsRef<[u8]> for Envelope {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Severity, Timestamp};

    fn events(ids: impl IntoIterator<Item = u64>) -> Vec<StoredEvent> {
        ids.into_iter()
            .map(|id| StoredEvent {
                id,
                event_type: "a.b".into(),
                organization_id: None,
                domain_id: None,
                severity: Severity::Info,
                timestamp: Timestamp(0),
                json: "{}".into(),
            })
            .collect()
    }

    #[test]
    fn work_is_what_the_stream_lacks() {
        let mut progress = Progress::default();
        // A standby: never opened the log, handed nothing.
        assert!(!progress.has_work(0));
        // Became active: ask the stream where it stands.
        assert!(progress.has_work(10));
        progress.published = Some(10);
        assert!(!progress.has_work(10));
        assert!(progress.has_work(11));
        progress.take(events(11..=12));
        assert!(progress.has_work(10));
        progress.published = Some(12);
        assert!(!progress.has_work(12));
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut progress = Progress::default();
        progress.take(events(1..=MAX_QUEUED as u64));
        progress.take(events([MAX_QUEUED as u64 + 1]));
        assert_eq!(progress.queue.len(), MAX_QUEUED);
    }

    #[tokio::test]
    async fn the_outlet_never_waits() {
        let (tx, mut rx) = mpsc::channel(1);
        let outlet = Outlet { batches: tx };
        outlet.offer(&events([1]));
        outlet.offer(&events([2])); // full: dropped, not awaited
        outlet.offer(&[]);
        assert_eq!(rx.recv().await.map(|b| b[0].id), Some(1));
        assert!(rx.try_recv().is_err());
    }
}
