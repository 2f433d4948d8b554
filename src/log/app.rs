//! Application events posted over HTTP reach the log through its single writer: a request
//! travels a bounded channel into whichever pipeline holds the writer (replication or
//! triggers), which appends it between its own batches and answers once the append commits.
//!
//! ```text
//! POST /api/events --AppendRequest--> inbox --(write loop)--> append_app --> reply
//!                                                                     \--> bus
//! ```
//!
//! A request is one statement, so all-or-nothing. Keys already in the log (or repeated within
//! the request) are answered with the original id and appended again never.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{LogError, LogWriter, StoredEvent};
use crate::model::Event;

/// One event of a request, with its idempotency key.
#[derive(Debug, Clone)]
pub struct KeyedEvent {
    pub key: Option<String>,
    pub event: Event,
}

/// What became of one event of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub id: u64,
    pub key: Option<String>,
    /// The key was already in the log: nothing was appended, `id` is the original's.
    pub duplicate: bool,
}

/// Why a request was not appended. The append may have committed or not (`InDoubt`): a client
/// that retries with the same keys learns which.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendFailed {
    #[error("the event log write failed ({0}); retry with the same keys")]
    InDoubt(String),
}

pub struct AppendRequest {
    pub events: Vec<KeyedEvent>,
    pub reply: oneshot::Sender<Result<Vec<Appended>, AppendFailed>>,
}

/// The sending side, for the HTTP handler.
pub type Outbox = mpsc::Sender<AppendRequest>;

/// The receiving side, shared by the successive lives of the publisher's pipeline (one at a
/// time holds it).
pub type Inbox = Arc<Mutex<mpsc::Receiver<AppendRequest>>>;

/// A channel of at most `capacity` requests waiting for the writer.
pub fn channel(capacity: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, Arc::new(Mutex::new(rx)))
}

/// Appends one request and answers it. Returns what was stored, for the bus; an error ends
/// the pipeline's life as any failed append does.
pub async fn serve(
    writer: &mut LogWriter,
    request: AppendRequest,
) -> Result<Vec<StoredEvent>, LogError> {
    match writer.append_app(request.events).await {
        Ok((appended, stored)) => {
            // The client may have given up waiting; the events are in the log all the same.
            let _ = request.reply.send(Ok(appended));
            Ok(stored)
        }
        Err(err) => {
            let _ = request.reply.send(Err(AppendFailed::InDoubt(err.to_string())));
            Err(err)
        }
    }
}
