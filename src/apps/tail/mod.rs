//! `rowcast tail`: a terminal subscriber printing events as JSON lines.
//!
//! ```text
//! server --GET /ws/events?type=..&since=K--> frame --event, id > cursor--> stdout, one line
//!                                              \--control-------------> stderr (tracing)
//! ```
//!
//! What tail guarantees, given a server that keeps SPEC §5:
//!
//! - stdout carries events only, one per line: the envelope as the server sent it (key order
//!   and value text kept) without `subscription_ids`. Each line is flushed when printed.
//! - Ids on stdout strictly increase: nothing is printed twice, across reconnections too.
//! - Nothing is lost across reconnections while the log still holds it. The cursor is the
//!   last id printed, or further when the server vouched for it (`subscribed` in live mode,
//!   `caught_up`); every connection subscribes with `since=<cursor>`. A cursor older than
//!   retention gets `reset` from the server, and tail reports that gap as a warning.
//! - A reader of stdout that falls behind slows tail down in turn (each line is written
//!   before the next frame is read); the server may then close with 4008, and tail resumes.
//! - Drops (network, server restart, 1001, 4008 slow consumer, silence) are retried forever
//!   with backoff; refusals that retrying cannot fix (401/403 or another 4xx at the
//!   handshake, a refused filter, a bad flag) end the command with a [`TailError`].
//!
//! Longer than most files on purpose: one reconnect loop and what it promises about stdout.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::model::Severity;
use crate::ws::protocol::MAX_HISTORY;

mod endpoint;
mod frame;

use endpoint::{Endpoint, Filter, check_pattern};
use frame::{Connection, Cursor, Step, handle};

/// Where tail connects unless told otherwise: `rowcast serve`'s default listen address.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080";
/// Largest frame accepted by default (64 MiB, tungstenite's own default).
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 64 << 20;
/// First wait before reconnecting (jittered); doubles per failed attempt up to `--max-backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// A connection that lived this long counts as healthy and resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// TCP connect plus WebSocket handshake; a black-holed address must not hang tail.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often tail pings the server, so that a dead peer is noticed on a quiet connection.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A connection that has received nothing (pongs included) for this long is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// How long a polite close may take before tail leaves anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes of a refusal's body repeated in the error.
const REFUSAL_BODY_CHARS: usize = 200;

/// Flags of `rowcast tail`; each also reads an environment variable.
#[derive(Clone, clap::Args)]
pub struct TailArgs {
    /// Server to subscribe to: its base URL or the full `.../ws/events` URL (ws://, wss://,
    /// http:// or https://). wss:// trusts the system's root certificates (or SSL_CERT_FILE).
    #[arg(long, env = "ROWCAST_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Event types: `*`, `entity.*`, `*.action` or `entity.action`. Repeat the flag or separate
    /// patterns with commas [default: *].
    #[arg(long = "type", env = "ROWCAST_TAIL_TYPE", value_name = "PATTERN", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only events of these organizations (repeatable, or comma-separated).
    #[arg(long, env = "ROWCAST_TAIL_ORGANIZATION_ID", value_name = "ID", value_delimiter = ',')]
    pub organization_id: Vec<String>,
    /// Only events of these domains (repeatable, or comma-separated).
    #[arg(long, env = "ROWCAST_TAIL_DOMAIN_ID", value_name = "ID", value_delimiter = ',')]
    pub domain_id: Vec<String>,
    /// Minimum severity.
    #[arg(long, env = "ROWCAST_TAIL_SEVERITY", value_name = "info|warning|error")]
    pub severity: Option<Severity>,
    /// Start after this event id: retained events with a greater id come first, then live
    /// ones [default: live events only].
    #[arg(long, env = "ROWCAST_TAIL_SINCE", value_name = "ID", conflicts_with = "history")]
    pub since: Option<u64>,
    /// Start with the last N matching events (1 to 1000), then live ones. Applies to the first
    /// connection; reconnections resume after the last event printed.
    #[arg(long, env = "ROWCAST_TAIL_HISTORY", value_name = "N")]
    pub history: Option<usize>,
    /// Row-content predicate `path:op[:value]`, e.g. `status:eq:failed`,
    /// `status:in:failed,error`, `old.status:changed`, `priority:gt:3` (repeatable; all must
    /// hold). Not comma-separated: `in` lists use commas.
    #[arg(long = "where", env = "ROWCAST_TAIL_WHERE", value_name = "PREDICATE")]
    pub predicates: Vec<String>,
    /// Bearer token for a server run with `--auth jwt`; sent in the Authorization header,
    /// never printed or logged.
    #[arg(long, env = "ROWCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Longest wait between reconnection attempts (1s, 30s, 5m).
    #[arg(long, env = "ROWCAST_TAIL_MAX_BACKOFF", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub max_backoff: Duration,
    /// Largest frame accepted from the server, in bytes; a bigger event cannot be printed.
    #[arg(long, env = "ROWCAST_TAIL_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_frame_bytes: u64,
}

/// Why `rowcast tail` stopped. All of these are definite: retrying cannot fix them, so the
/// retryable failures (network, restarts, closes) never leave this module.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("invalid --{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("wss:// needs root certificates to trust, and the system has none{0}")]
    NoRoots(String),
    #[error("setting up TLS")]
    TlsSetup(#[source] rustls::Error),
    #[error("TLS to the server cannot work")]
    Tls(#[source] tungstenite::error::TlsError),
    /// An untrusted certificate, or one for another name: retrying would not help.
    #[error("the server's TLS certificate is refused: {0}")]
    Certificate(rustls::Error),
    #[error("the server refused the WebSocket handshake: HTTP {status}{detail}{hint}")]
    Refused { status: StatusCode, detail: String, hint: &'static str },
    #[error("the server refused the subscription ({code}): {message}")]
    Subscription { code: String, message: String },
    #[error("cannot build the handshake request")]
    Request(#[source] tungstenite::Error),
    #[error("writing to stdout failed")]
    Output(#[source] io::Error),
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> TailError {
    TailError::Invalid { flag, reason: reason.into() }
}

/// A validated `rowcast tail`: where to connect, what to ask for, how to retry.
#[derive(Debug)]
pub struct Tail {
    endpoint: Endpoint,
    filter: Filter,
    since: Option<u64>,
    /// `--history`: asked for by a connection only while nothing is printed or vouched for.
    history: Option<usize>,
    /// `Bearer <token>`, marked sensitive so that no `Debug` shows it.
    authorization: Option<HeaderValue>,
    max_backoff: Duration,
    max_frame_bytes: usize,
    /// For wss://: rustls with the system's roots, read once at start.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Tail {
    pub fn new(args: TailArgs) -> Result<Self, TailError> {
        let endpoint = Endpoint::parse(&args.url)?;
        for pattern in &args.types {
            check_pattern(pattern)?;
        }
        for (flag, ids) in
            [("organization-id", &args.organization_id), ("domain-id", &args.domain_id)]
        {
            if ids.iter().any(|id| id.is_empty()) {
                return Err(invalid(flag, "empty id"));
            }
        }
        let authorization = match args.token {
            Some(token) if token.is_empty() => return Err(invalid("token", "empty token")),
            Some(token) => {
                // Never echo the token, not even in this error.
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| invalid("token", "it holds characters an HTTP header cannot"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        for predicate in &args.predicates {
            crate::filter::Predicate::from_query(predicate)
                .map_err(|err| invalid("where", err.to_string()))?;
        }
        if args.history.is_some_and(|n| !(1..=MAX_HISTORY).contains(&n)) {
            return Err(invalid("history", format!("must be from 1 to {MAX_HISTORY}")));
        }
        if args.max_backoff.is_zero() {
            return Err(invalid("max-backoff", "must be at least 1s"));
        }
        let tls = if endpoint.is_tls() { Some(tls_config()?) } else { None };
        Ok(Self {
            tls,
            endpoint,
            filter: Filter {
                types: args.types,
                organization_ids: args.organization_id,
                domain_ids: args.domain_id,
                severity: args.severity,
                predicates: args.predicates,
            },
            since: args.since,
            history: args.history,
            authorization,
            max_backoff: args.max_backoff,
            max_frame_bytes: usize::try_from(args.max_frame_bytes).unwrap_or(usize::MAX),
        })
    }

    /// Prints events to `out` until `shutdown` (then closes the socket politely), until `out`
    /// is closed (a finished `| head`), or until a definite refusal.
    pub async fn run<W>(&self, mut out: W, shutdown: CancellationToken) -> Result<(), TailError>
    where
        W: AsyncWrite + Unpin,
    {
        let mut cursor = Cursor(self.since);
        let mut backoff = Backoff::new(INITIAL_BACKOFF, self.max_backoff);
        tracing::info!(url = %self.endpoint.as_str(), since = self.since, "tailing");
        loop {
            // Once the cursor holds, resuming after it is what `--history` asked for too.
            let history = self.history.filter(|_| cursor.0.is_none());
            let url = self.endpoint.with_query(&self.filter.query(cursor.0, history));
            let ended = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                connected = self.connect(&url) => match connected {
                    Ok(ws) => {
                        tracing::debug!(since = cursor.0, "connected");
                        self.session(ws, history.is_some(), &mut cursor, &mut out, &shutdown).await?
                    }
                    Err(Failure::Definite(err)) => return Err(err),
                    Err(Failure::Retryable(reason)) => {
                        Ended::Dropped { reason: format!("cannot connect: {reason}"), healthy: false }
                    }
                },
            };
            let Ended::Dropped { reason, healthy } = ended else { return Ok(()) };
            if healthy {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                %reason, retry_in_ms = delay.as_millis() as u64, since = cursor.0,
                "not connected; retrying"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self, url: &str) -> Result<Socket, Failure> {
        let mut request =
            url.into_client_request().map_err(|err| Failure::Definite(TailError::Request(err)))?;
        if let Some(authorization) = &self.authorization {
            request.headers_mut().insert(header::AUTHORIZATION, authorization.clone());
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.max_frame_bytes))
            .max_frame_size(Some(self.max_frame_bytes));
        let handshake = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            self.tls.clone().map(Connector::Rustls),
        );
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok((socket, _response))) => Ok(socket),
            Ok(Err(err)) => Err(Failure::from_handshake(err)),
            Err(_) => Err(Failure::Retryable(format!(
                "no handshake within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// One connection, from handshake to its end.
    async fn session<W>(
        &self,
        mut socket: Socket,
        history: bool,
        cursor: &mut Cursor,
        out: &mut W,
        shutdown: &CancellationToken,
    ) -> Result<Ended, TailError>
    where
        W: AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let mut connection = Connection { history, ..Connection::default() };
        let mut heard = Instant::now();
        let mut ping = tokio::time::interval_at(started + PING_INTERVAL, PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let dropped = |reason: String, connection: &Connection| Ended::Dropped {
            reason,
            healthy: connection.printed > 0 || started.elapsed() >= HEALTHY_AFTER,
        };
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    goodbye(socket).await;
                    return Ok(Ended::Stopped);
                }
                message = socket.next() => message,
                _ = ping.tick() => {
                    if heard.elapsed() >= SILENCE_LIMIT {
                        return Ok(dropped("the server went silent".into(), &connection));
                    }
                    if let Err(err) = socket.send(Message::Ping(Default::default())).await {
                        return Ok(dropped(err.to_string(), &connection));
                    }
                    continue;
                }
            };
            heard = Instant::now();
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(bytes))) => {
                    tracing::warn!(bytes = bytes.len(), "ignoring a binary frame");
                    continue;
                }
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite has queued the answer; send it, but do not wait for the
                    // server to end TCP, which a confused server may never do.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.flush()).await;
                    return Ok(dropped(describe_close(frame.as_ref()), &connection));
                }
                // Pings are answered by tungstenite; pongs only prove the peer is alive.
                Some(Ok(_)) => continue,
                Some(Err(tungstenite::Error::Capacity(err))) => {
                    let reason = format!("{err} (raise --max-frame-bytes to receive it)");
                    return Ok(dropped(reason, &connection));
                }
                Some(Err(err)) => return Ok(dropped(err.to_string(), &connection)),
                None => {
                    return Ok(dropped(
                        "the connection ended without a close frame".into(),
                        &connection,
                    ));
                }
            };
            match handle(&text, cursor, &mut connection) {
                Step::Skip => {}
                Step::Fatal(err) => {
                    goodbye(socket).await;
                    return Err(err);
                }
                Step::Print { id, line } => match print(out, line, shutdown).await {
                    Printed::Done => {
                        cursor.advance(id);
                        connection.printed += 1;
                        // Time spent blocked on stdout is not the server's silence.
                        heard = Instant::now();
                    }
                    Printed::Stopped => {
                        goodbye(socket).await;
                        return Ok(Ended::Stopped);
                    }
                    Printed::Failed(err) => {
                        goodbye(socket).await;
                        return Err(TailError::Output(err));
                    }
                },
            }
        }
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// rustls on `ring` with the system's roots (`rustls-native-certs`, which honours
/// `SSL_CERT_FILE` and `SSL_CERT_DIR`); the provider is named, never the process default.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, TailError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        let detail = loaded.errors.first().map(|err| format!(": {err}")).unwrap_or_default();
        return Err(TailError::NoRoots(detail));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TailError::TlsSetup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What became of one line.
enum Printed {
    Done,
    /// Shutdown was asked for while writing, or stdout is closed (a finished `| head`).
    Stopped,
    Failed(io::Error),
}

/// Writes and flushes one line. A reader that stopped reading blocks this, which is the
/// backpressure wanted, but must not keep tail from stopping.
async fn print<W: AsyncWrite + Unpin>(
    out: &mut W,
    mut line: String,
    shutdown: &CancellationToken,
) -> Printed {
    line.push('\n');
    let write = async {
        out.write_all(line.as_bytes()).await?;
        out.flush().await
    };
    let written = tokio::select! {
        written = write => written,
        _ = shutdown.cancelled() => return Printed::Stopped,
    };
    match written {
        Ok(()) => Printed::Done,
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
            tracing::debug!("stdout closed");
            Printed::Stopped
        }
        Err(err) => Printed::Failed(err),
    }
}

/// Closes with 1000 and waits briefly for the server's close reply.
async fn goodbye(mut socket: Socket) {
    let polite = async {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        if socket.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, polite).await;
}

fn describe_close(frame: Option<&CloseFrame>) -> String {
    let Some(frame) = frame else { return "closed by the server without a code".into() };
    let meaning = match u16::from(frame.code) {
        1000 => "closed by the server",
        1001 => "the server is shutting down",
        1008 => "closed by the server for a policy violation",
        1009 => "closed by the server: a frame was too big",
        4001 => "the token expired",
        4008 => "too slow for the server (slow consumer)",
        _ => "closed by the server",
    };
    format!("{meaning} (close {}: {:?})", u16::from(frame.code), frame.reason.as_str())
}

/// How one connection ended, when it did not end the command.
#[derive(Debug)]
enum Ended {
    /// Shutdown was asked for, or stdout is gone.
    Stopped,
    /// Worth reconnecting; `healthy` connections reset the backoff.
    Dropped { reason: String, healthy: bool },
}

/// Why a connection attempt failed.
#[derive(Debug)]
enum Failure {
    Retryable(String),
    Definite(TailError),
}

impl Failure {
    fn from_handshake(err: tungstenite::Error) -> Self {
        let response = match err {
            tungstenite::Error::Http(response) => response,
            tungstenite::Error::Url(_) | tungstenite::Error::HttpFormat(_) => {
                return Failure::Definite(TailError::Request(err));
            }
            tungstenite::Error::Tls(err) => return Failure::Definite(TailError::Tls(err)),
            tungstenite::Error::Io(err) => {
                let rejected = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
                return match rejected {
                    Some(rejected @ rustls::Error::InvalidCertificate(_)) => {
                        Failure::Definite(TailError::Certificate(rejected.clone()))
                    }
                    _ => Failure::Retryable(err.to_string()),
                };
            }
            other => return Failure::Retryable(other.to_string()),
        };
        let status = response.status();
        let retryable = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        if retryable {
            return Failure::Retryable(format!("the server answered HTTP {status}"));
        }
        let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
        let body: String =
            body.trim().chars().filter(|c| !c.is_control()).take(REFUSAL_BODY_CHARS).collect();
        let detail = if body.is_empty() { String::new() } else { format!(": {body}") };
        let hint = match status.as_u16() {
            401 => " (check --token / ROWCAST_TOKEN)",
            403 => " (the token does not grant this, or the server does not allow this origin)",
            404 => " (is --url a rowcast server?)",
            200..=299 => " instead of switching to WebSocket (is --url a rowcast server?)",
            300..=399 => " (redirects are not followed; point --url at the final address)",
            _ => "",
        };
        Failure::Definite(TailError::Refused { status, detail, hint })
    }
}

#[cfg(test)]
mod tests;
