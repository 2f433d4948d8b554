//! Settings of the publisher, their defaults and their validation.
//!
//! Every bound the pipeline has is here, named and documented; the CLI maps flags and
//! environment variables onto these.

use std::sync::Arc;
use std::time::Duration;

use crate::mapping::Mapping;
use crate::pg::Target;

/// Which capture source feeds the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceMode {
    /// Replication when the server and role allow it, otherwise triggers.
    Auto,
    /// A logical replication slot with pgoutput.
    Replication,
    /// Row triggers writing to an outbox, woken by NOTIFY.
    Triggers,
}

impl SourceMode {
    /// The source in use, as stats and metrics name it (`auto` is resolved before serving).
    pub fn name(self) -> &'static str {
        match self {
            SourceMode::Triggers => "triggers",
            SourceMode::Replication | SourceMode::Auto => "replication",
        }
    }
}

/// What one process does (SPEC §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// Capture, the log and the WebSocket/HTTP front in one process, with nothing but Postgres.
    #[default]
    All,
    /// Capture into the log and publish every appended event to the JetStream stream; serves
    /// HTTP (history, emit, stats) but no WebSocket clients.
    Publisher,
    /// Serve WebSocket/HTTP clients from the JetStream stream, reading the log for the rest.
    Gateway,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Publisher => "publisher",
            Role::Gateway => "gateway",
        }
    }

    /// Whether this process captures into the log (and so holds, or waits for, its lock).
    pub fn captures(self) -> bool {
        self != Role::Gateway
    }

    /// Whether this process serves WebSocket clients from its bus.
    pub fn serves_clients(self) -> bool {
        self != Role::Publisher
    }
}

/// The JetStream side of `--role publisher|gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// Servers to connect to (`--nats-url`, comma-separated); the client fails over among
    /// them and the ones the cluster announces.
    pub urls: Vec<String>,
    /// The stream (default `ROWCAST`).
    pub stream: String,
    /// Subjects are `<prefix>.<org>.<domain>.<entity>.<action>` (default `rowcast.events`).
    pub subject_prefix: String,
    /// Copies of the stream the cluster keeps (default 1; 3 on a three-server cluster).
    pub replicas: usize,
    /// Messages older than this leave the stream (default 24 h). The log keeps its own
    /// retention: gateways read it for anything the stream no longer has.
    pub max_age: Duration,
    /// Bytes the stream may hold, oldest dropped first (default unlimited: `None`).
    pub max_bytes: Option<u64>,
    /// How long the stream remembers message ids to drop a republished one (default 2 min).
    pub duplicate_window: Duration,
    /// A gateway that received nothing for this long asks the log for its head, so an event
    /// the stream lost is still delivered (default 1 s).
    pub idle_check: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            stream: "ROWCAST".into(),
            subject_prefix: "rowcast.events".into(),
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
            idle_check: Duration::from_secs(1),
        }
    }
}

impl NatsSettings {
    /// Checks what the server would refuse later, with a message that names the flag.
    pub fn check(&self) -> Result<(), String> {
        if self.urls.is_empty() {
            return Err("--role publisher and --role gateway need --nats-url".into());
        }
        for url in &self.urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|err| format!("--nats-url {url:?} is not a NATS server address: {err}"))?;
        }
        let stream_ok = !self.stream.is_empty()
            && self.stream.len() <= 255
            && self.stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !stream_ok {
            return Err(format!(
                "--nats-stream {:?} must be 1-255 characters of A-Z, a-z, 0-9, _ and -",
                self.stream
            ));
        }
        let prefix_ok = self.subject_prefix.split('.').all(|token| {
            !token.is_empty()
                && token.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'>'))
        });
        if !prefix_ok {
            return Err(format!(
                "--nats-subject-prefix {:?} must be dot-separated tokens without spaces, * or >",
                self.subject_prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!("--nats-replicas {} must be 1 to 5", self.replicas));
        }
        if self.duplicate_window > self.max_age {
            return Err("--nats-duplicate-window must not exceed --nats-max-age".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// What this process does (default `all`).
    pub role: Role,
    /// The stream publishers write to and gateways read from (roles other than `all`).
    pub nats: NatsSettings,
    /// The database whose changes are captured.
    pub database: Target,
    /// Where the event log lives; by default the source database.
    pub log: Target,
    pub mapping: Arc<Mapping>,
    pub source: SourceMode,
    /// Replication slot name (default `rowcast`).
    pub slot: String,
    /// Publication name (default `rowcast`).
    pub publication: String,
    /// Most events appended in one log transaction (default 1000). Also bounds how much of a
    /// large source transaction is held in memory at once.
    pub batch_size: usize,
    /// Captured items buffered between capture and the log writer (default 4096).
    pub queue_capacity: usize,
    /// Events older than this are trimmed from the log (default 7 days).
    pub retention: Duration,
    /// How often the slot position is reported even when idle (default 10 s).
    pub status_interval: Duration,
    /// Largest protocol message accepted from the server (default 1 GiB + 64 KiB: one maximal
    /// Postgres value plus its row).
    pub max_message_bytes: usize,
    /// Longest wait between reconnection attempts (default 5 s): how long capture may stay
    /// down after a fault ends.
    pub max_backoff: Duration,
    /// Trigger capture: how often the outbox is checked without a notification (default 1 s).
    pub poll_interval: Duration,
    /// Why `--source auto` chose the source, for stats.
    pub source_reason: Option<String>,
    /// The WebSocket and HTTP side.
    pub server: ServerSettings,
}

/// Bounds of the delivery side (WebSocket and HTTP).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address the HTTP/WebSocket server listens on (default 127.0.0.1:8080).
    pub listen: std::net::SocketAddr,
    /// Largest client frame accepted; bigger ones close the connection with 1009 (default 64 KiB).
    pub max_frame_bytes: usize,
    /// Bytes of frames waiting to be written to one connection (default 16 MiB). A client
    /// that lets more pile up is not dropped: it stops receiving live events and catches up
    /// from the log, and its catch-up buffers are bounded by the same amount.
    pub outbound_bytes: usize,
    /// A client whose last delivered event is this much older (by commit time) than the
    /// newest one published is closed with 4008 (default 5 min).
    pub max_lag: Duration,
    /// A client whose socket accepts nothing for this long while there is something to write
    /// is closed with 4008 (default 30 s).
    pub write_timeout: Duration,
    /// How often the server pings an otherwise quiet connection (default 20 s).
    pub ping_interval: Duration,
    /// A connection the client has not sent anything on (pongs count) for this long is closed
    /// (default 60 s).
    pub idle_timeout: Duration,
    /// Subscriptions one connection may hold (default 100).
    pub max_subscriptions: usize,
    /// Replays one connection may run at once (default 4).
    pub max_replays: usize,
    /// Most events one history request returns (default 1000; 100 when `limit` is not given).
    pub max_history_page: usize,
    /// How long a closing connection may take to flush its close frame after what the socket
    /// already holds; past it the connection is dropped without one (default 5 s).
    pub close_timeout: Duration,
    /// Who may connect and what they see (default: no tokens, loopback only).
    pub auth: crate::auth::Auth,
    /// Browser origins allowed to open WebSockets; `None`: any.
    pub allowed_origins: Option<Vec<String>>,
    /// Open WebSocket connections at most; more are refused with 503 (default 10,000).
    pub max_connections: usize,
    /// Client frames per second one connection may send, on average (default 20).
    pub message_rate: u32,
    /// Client frames one connection may send in a burst (default 40). Frames over the rate get
    /// `rate_limited` errors; sustained abuse closes the connection with 1008.
    pub message_burst: u32,
    /// Time a client has to send its request headers (default 10 s).
    pub handshake_timeout: Duration,
    /// Largest application event (its `data` as JSON) accepted over HTTP (default 1 MiB).
    pub max_event_bytes: usize,
    /// Largest `POST /api/events` body (default 16 MiB); refused with 413 before it is read whole.
    pub max_request_bytes: usize,
    /// Posted requests waiting for the log's writer (default 64); more wait for a place.
    pub append_queue: usize,
    /// How long a `since` cursor beyond this server's newest event is waited for before it is
    /// answered with a `cursor_ahead` reset. Gateways (5 s, set by the server) each follow the
    /// stream at their own pace, so a client that resumes on another gateway may hold an id
    /// that one has not reached yet; in one process (0) such a cursor is simply not this log's.
    pub cursor_ahead_wait: Duration,
    /// Where the Postgres-protocol endpoint listens (SPEC §11); `None` (the default): off.
    pub pg_listen: Option<std::net::SocketAddr>,
    /// TLS for clients of the Postgres-protocol endpoint that ask for it; `None` (the default):
    /// they are told no and go on in the clear.
    pub pg_tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_frame_bytes: 64 << 10,
            outbound_bytes: 16 << 20,
            max_lag: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            max_subscriptions: 100,
            max_replays: 4,
            max_history_page: 1000,
            close_timeout: Duration::from_secs(5),
            auth: crate::auth::Auth::None,
            allowed_origins: None,
            max_connections: 10_000,
            message_rate: 20,
            message_burst: 40,
            handshake_timeout: Duration::from_secs(10),
            max_event_bytes: 1 << 20,
            max_request_bytes: 16 << 20,
            append_queue: 64,
            cursor_ahead_wait: Duration::ZERO,
            pg_listen: None,
            pg_tls: None,
        }
    }
}

impl Settings {
    pub fn new(database: Target) -> Self {
        Self {
            role: Role::All,
            nats: NatsSettings::default(),
            log: database.clone(),
            database,
            mapping: Arc::new(Mapping::builtin()),
            source: SourceMode::Replication,
            slot: "rowcast".into(),
            publication: "rowcast".into(),
            batch_size: 1000,
            queue_capacity: 4096,
            retention: Duration::from_secs(7 * 24 * 3600),
            status_interval: Duration::from_secs(10),
            max_message_bytes: (1 << 30) + (64 << 10),
            max_backoff: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            source_reason: None,
            server: ServerSettings::default(),
        }
    }
}

/// Parses a duration as humantime reads it (`30s`, `15m`, `12h`, `7d`, `1h30m`, `500ms`) or a
/// bare number of seconds (`90`), which humantime refuses for want of a unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("duration {text:?} is too large"));
    }
    // humantime also reads `7 days`; one word keeps flags and environment values unambiguous.
    if text.contains(char::is_whitespace) {
        return Err(format!("{text:?} has spaces; write a duration like 30s, 15m, 12h or 7d"));
    }
    humantime::parse_duration(text)
        .map_err(|err| format!("{text:?} is not a duration like 30s, 15m, 12h or 7d: {err}"))
}

/// A slot or publication name: what Postgres accepts for replication slots, so it can be used
/// for both without surprises.
pub fn check_object_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!("{what} name {name:?} must be 1-63 characters of a-z, 0-9 and _"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_duration("7 days").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("99999999999999999999").is_err());
        for junk in ["5x", "m", "1.5.2s", "30s junk"] {
            assert!(parse_duration(junk).is_err(), "{junk:?}");
        }
        let err = parse_duration("5x").expect_err("unknown unit");
        assert!(err.contains("30s, 15m") && err.contains("\"x\""), "{err}");
    }

    #[test]
    fn nats_settings_are_checked() {
        let good =
            NatsSettings { urls: vec!["nats://127.0.0.1:4222".into()], ..Default::default() };
        assert_eq!(good.check(), Ok(()));
        let with = |change: fn(&mut NatsSettings)| {
            let mut settings = good.clone();
            change(&mut settings);
            settings.check()
        };
        assert!(with(|s| s.urls.clear()).is_err_and(|e| e.contains("--nats-url")));
        assert!(with(|s| s.urls = vec!["nats://[::1".into()]).is_err());
        assert!(with(|s| s.stream = "ROW.CAST".into()).is_err_and(|e| e.contains("--nats-stream")));
        assert!(with(|s| s.stream = String::new()).is_err());
        assert!(with(|s| s.subject_prefix = "rowcast.*".into()).is_err());
        assert!(with(|s| s.subject_prefix = "rowcast..events".into()).is_err());
        assert!(with(|s| s.subject_prefix = "rc".into()).is_ok());
        assert!(with(|s| s.replicas = 0).is_err());
        assert!(with(|s| s.replicas = 6).is_err());
        assert!(with(|s| s.replicas = 3).is_ok());
        assert!(with(|s| s.max_age = Duration::from_secs(60)).is_err());
    }

    #[test]
    fn roles() {
        assert!(Role::All.captures() && Role::All.serves_clients());
        assert!(Role::Publisher.captures() && !Role::Publisher.serves_clients());
        assert!(!Role::Gateway.captures() && Role::Gateway.serves_clients());
    }

    #[test]
    fn object_names() {
        assert!(check_object_name("slot", "rowcast_1").is_ok());
        assert!(check_object_name("slot", "Rowcast").is_err());
        assert!(check_object_name("slot", "").is_err());
        assert!(check_object_name("slot", "a\"b").is_err());
    }
}
