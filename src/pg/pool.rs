//! A few shared Postgres connections for readers (history, catch-up, stats), opened lazily
//! and replaced when they break. tokio-postgres pipelines concurrent queries on one
//! connection, so a handful serve many readers; no reader ever waits for another's result.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

pub struct Pool {
    target: super::Target,
    role: &'static str,
    slots: Vec<Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(mut target: super::Target, role: &'static str, size: usize) -> Self {
        // A reader waiting on an unreachable server holds its slot: give up in time.
        if target.config.get_connect_timeout().is_none() {
            target.config.connect_timeout(super::DEFAULT_CONNECT_TIMEOUT);
        }
        let slots = (0..size.max(1)).map(|_| Mutex::new(None)).collect();
        Self { target, role, slots, next: AtomicUsize::new(0) }
    }

    /// A connection, round robin; a broken one is replaced first.
    pub async fn get(&self) -> Result<Arc<Client>, tokio_postgres::Error> {
        self.get_indexed().await.map(|(_, client)| client)
    }

    async fn get_indexed(&self) -> Result<(usize, Arc<Client>), tokio_postgres::Error> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[index].lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok((index, client.clone()));
        }
        let client = Arc::new(super::connect(&self.target, self.role).await?);
        *slot = Some(client.clone());
        Ok((index, client))
    }

    /// Runs `read` on a pooled connection, all within `limit` (connecting included). `None`
    /// when it did not finish in time: that connection is dropped from the pool, since it may
    /// sit on a dead path that a new one would not, and callers answer "unavailable" at once
    /// instead of hanging for as long as TCP takes to give up.
    pub async fn within<T>(
        &self,
        limit: Duration,
        read: impl AsyncFnOnce(&Client) -> T,
    ) -> Option<Result<T, tokio_postgres::Error>> {
        let deadline = tokio::time::Instant::now() + limit;
        let (index, client) = match tokio::time::timeout_at(deadline, self.get_indexed()).await {
            Ok(Ok(got)) => got,
            Ok(Err(err)) => return Some(Err(err)),
            Err(_) => return None,
        };
        match tokio::time::timeout_at(deadline, read(&client)).await {
            Ok(value) => Some(Ok(value)),
            Err(_) => {
                let mut slot = self.slots[index].lock().await;
                if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, &client)) {
                    *slot = None;
                }
                None
            }
        }
    }
}
