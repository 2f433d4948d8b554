//! The Postgres-protocol endpoint (SPEC §11, `--pg-listen`): the event log for any Postgres
//! driver. History with `SELECT ... FROM events`, a live stream with
//! `COPY (SUBSCRIBE TO events WHERE ... [SINCE n]) TO STDOUT`.
//!
//! ```text
//!   accept (this file): a connection permit (else FATAL 53300), a watch on the socket (peer.rs)
//!     └─ pgwire::process_socket: TLS if asked (tls.rs), startup, simple and extended queries
//!          └─ session.rs: authentication (the password is a token), statements
//!               ├─ sql.rs: the SQL subset → Filter + ids/times, or 0A000 naming what is not
//!               ├─ select.rs: history pages from the log → rows (rows.rs)
//!               └─ subscribe.rs: a bus subscription with its mailbox, catch-ups and lag
//!                                handling (those of WebSocket, `bus::catch_up`, `bus::lag`)
//! ```
//!
//! Errors are Postgres errors with a SQLSTATE and a message that says what to do: 28P01 a
//! token that does not verify (FATAL, as Postgres ends a failed login), 42501 a filter outside
//! the token's scope, 0A000 SQL outside the subset, 55000 a cursor older than the log, 53400 a
//! subscriber too far behind, 57P01 a shutdown, 57014 a cancel request, 22P02 a parameter that
//! cannot be read as its type. Apart from FATAL ones the connection stays
//! usable. This transport takes from the server only what it needs ([`Context`]: limits and
//! token verifier, bus, log readers, mapping), never `ws/`.

mod peer;
mod rows;
mod select;
mod session;
pub mod sql;
mod subscribe;
pub mod tls;

use std::sync::Arc;

use pgwire::api::{ConnectionManager, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::bus::catch_up::Sources;
use crate::config::ServerSettings;
use crate::http::AppState;
use crate::log::EventLog;
use peer::Peer;
use session::Session;

/// The pause after a failed `accept` (out of file descriptors and the like).
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// What a Postgres-protocol connection may use of the server.
pub struct Context {
    /// Limits (`outbound_bytes`, `max_lag`, `write_timeout`, `close_timeout`) and the token
    /// verifier (`auth`).
    pub limits: ServerSettings,
    pub bus: Arc<Bus>,
    pub history: EventLog,
    /// The mapping, whose redacted columns conditions may not name.
    pub mapping: Arc<crate::mapping::Mapping>,
    /// Every connection, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Connection permits, shared with WebSocket (`--max-connections`).
    pub connections: Arc<Semaphore>,
    /// Where cancel requests find the query they cancel.
    pub cancels: Arc<ConnectionManager>,
}

impl Sources for Context {
    type History = EventLog;

    fn bus(&self) -> &Bus {
        &self.bus
    }

    fn history(&self) -> &EventLog {
        &self.history
    }
}

/// The parts of the server's state this endpoint uses.
pub fn context(state: &AppState) -> Arc<Context> {
    Arc::new(Context {
        limits: state.settings.server.clone(),
        bus: state.bus.clone(),
        history: EventLog(state.log.clone()),
        mapping: state.settings.mapping.clone(),
        sessions: state.sessions.clone(),
        connections: state.connections.clone(),
        cancels: Arc::new(ConnectionManager::new()),
    })
}

/// Accepts Postgres-protocol connections on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, context: Arc<Context>, shutdown: CancellationToken) {
    loop {
        let (stream, address) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a postgres-protocol connection failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let Ok(permit) = context.connections.clone().try_acquire_owned() else {
            tracing::warn!(%address, "too many connections; refusing a postgres-protocol one");
            let limit = context.limits.max_connections;
            context.sessions.spawn(refuse(stream, limit));
            continue;
        };
        let connection = connection(stream, context.clone(), shutdown.clone());
        context.sessions.spawn(async move {
            connection.await;
            drop(permit);
        });
    }
}

/// Tells a client over `--max-connections` why it is turned away (FATAL 53300, what Postgres
/// says): it is told no to TLS, its startup packet is read, then it gets the error.
async fn refuse(mut stream: tokio::net::TcpStream, limit: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// The codes of SSLRequest and GSSENCRequest, answered `N` (not here).
    const NEGOTIATIONS: [i32; 2] = [80_877_103, 80_877_104];
    /// The longest startup packet read; libpq's are far shorter.
    const STARTUP_BYTES: usize = 10_000;
    /// How long a refused client may take to hear why: a slow one does not hold the task.
    const REFUSAL: std::time::Duration = std::time::Duration::from_secs(2);
    let message = format!("too many connections (at most {limit}); try again later");
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "53300"), (b'M', &message)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let length = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    let mut frame = vec![b'E'];
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&body);
    let talk = async {
        let mut header = [0u8; 8];
        for _ in 0..3 {
            stream.read_exact(&mut header).await?;
            let length = i32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let code = i32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            if length == 8 && NEGOTIATIONS.contains(&code) {
                stream.write_all(b"N").await?;
                continue;
            }
            // The rest of the startup packet, read so that closing does not reset the socket.
            let rest = usize::try_from(length).unwrap_or(0).saturating_sub(8).min(STARTUP_BYTES);
            let mut skipped = vec![0u8; rest];
            stream.read_exact(&mut skipped).await?;
            break;
        }
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        // Until the client closes, so that our close does not reset what it still reads.
        let mut sink = [0u8; 256];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL, talk).await;
}

/// Serves one connection until it ends, is abandoned, or the server shuts down (a running
/// `SUBSCRIBE` then gets `close_timeout` to say so).
async fn connection(
    stream: tokio::net::TcpStream,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let (stream, peer) = match Peer::watch(stream) {
        Ok(watched) => watched,
        Err(err) => {
            tracing::debug!(error = %err, "cannot watch a postgres-protocol socket");
            return;
        }
    };
    let close_timeout = context.limits.close_timeout;
    let tls = context.limits.pg_tls.clone().map(pgwire::tokio::TlsAcceptor::from);
    let session = Arc::new(Session::new(context, peer));
    let handlers = Handlers(session.clone());
    let served = pgwire::tokio::process_socket(stream, tls, handlers);
    tokio::select! {
        result = served => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "postgres-protocol connection ended");
            }
        }
        () = session.peer().abandoned() => {}
        () = async {
            shutdown.cancelled().await;
            if session.is_subscribed() {
                tokio::time::sleep(close_timeout).await;
            }
        } => {}
    }
}

/// The handlers of one connection: its session plays every part but copy-in (refused) and
/// cancel (the server's registry of running queries).
struct Handlers(Arc<Session>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl pgwire::api::query::SimpleQueryHandler> {
        self.0.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl pgwire::api::query::ExtendedQueryHandler> {
        self.0.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.0.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        Arc::new(pgwire::api::cancel::DefaultCancelHandler::new(self.0.cancels()))
    }
}

/// An error the connection survives.
fn error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), code.into(), message.into())))
}

/// An error that ends the connection.
fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("FATAL".into(), code.into(), message.into())))
}

/// The connection's token expired: at a statement, or during a subscription.
fn token_expired() -> PgWireError {
    fatal("28000", "the token has expired; reconnect with a fresh one")
}
