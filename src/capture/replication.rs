//! A logical replication client that speaks the streaming replication protocol itself.
//!
//! ```text
//! startup (replication=database, UTC/ISO session) -> auth (trust | cleartext | md5 | SCRAM)
//!   -> IDENTIFY_SYSTEM / CREATE_REPLICATION_SLOT (simple query protocol)
//!   -> START_REPLICATION SLOT s LOGICAL lsn (proto_version '1', publication_names 'p')
//!   -> CopyBoth: server sends XLogData ('w') and keepalives ('k'),
//!                we send standby status updates ('r')
//! ```
//!
//! The session pins `TimeZone=UTC`, `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `bytea_output=hex` because pgoutput renders every value with the
//! walsender's output functions: these settings make the text forms exactly the ones
//! [`crate::capture::render`] expects, whatever the server's defaults are.
//!
//! Framing is ours (postgres-protocol has no CopyBothResponse); message bodies that
//! postgres-protocol knows are parsed by it. Every frame length is checked against
//! `max_message_bytes` before anything is allocated for it.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::pg::{Lsn, Transience, format_lsn, quote_ident, quote_literal};

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("connecting to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    #[error("server said {code}: {message}")]
    Server { code: String, message: String },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("unsupported connection setting: {0}")]
    Unsupported(String),
    #[error(
        "server message of {size} bytes exceeds the limit of {limit} bytes (max_message_bytes)"
    )]
    TooLarge { size: usize, limit: usize },
}

impl ReplicationError {
    /// Whether reconnecting later may succeed (the rule of [`crate::pg::sqlstate_transience`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Io(_) => true,
            // A slot held by a dying session (55006) or a server restarting pass; bad
            // credentials, a missing object, wal_level not logical, removed WAL do not.
            Self::Server { code, .. } => {
                crate::pg::sqlstate_transience(code) == Transience::Transient
            }
            Self::Auth(_) | Self::Unsupported(_) => false,
            // These would fail again at the same position after a reconnect.
            Self::Protocol(_) | Self::TooLarge { .. } => false,
        }
    }
}

/// Where and as whom to connect; taken from the same URL `tokio-postgres` parses.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub targets: Vec<Target>,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub database: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

impl ConnectParams {
    pub fn from_config(
        config: &tokio_postgres::Config,
        max_message_bytes: usize,
    ) -> Result<Self, ReplicationError> {
        use tokio_postgres::config::{Host, SslMode};
        if config.get_ssl_mode() == SslMode::Require {
            return Err(ReplicationError::Unsupported(
                "sslmode=require: TLS is not supported yet; use sslmode=disable or prefer".into(),
            ));
        }
        let ports = config.get_ports();
        let mut targets = Vec::new();
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            targets.push(match host {
                Host::Tcp(host) => Target::Tcp { host: host.clone(), port },
                Host::Unix(dir) => Target::Unix { path: dir.join(format!(".s.PGSQL.{port}")) },
            });
        }
        if targets.is_empty() {
            let port = ports.first().copied().unwrap_or(5432);
            targets.push(Target::Unix {
                path: PathBuf::from(format!("/var/run/postgresql/.s.PGSQL.{port}")),
            });
        }
        let user = match config.get_user() {
            Some(user) => user.to_owned(),
            None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        };
        Ok(Self {
            targets,
            database: config.get_dbname().unwrap_or(&user).to_owned(),
            password: config.get_password().map(<[u8]>::to_vec),
            user,
            application_name: config.get_application_name().unwrap_or("rowcast").to_owned(),
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            max_message_bytes,
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One replication connection: a socket, a read buffer and our own framing.
pub struct ReplicationClient {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    max_message_bytes: usize,
}

/// A complete backend frame: its tag and its whole bytes (header included, as
/// postgres-protocol's parser wants them).
struct Frame {
    tag: u8,
    bytes: BytesMut,
}

/// One row of a simple-query result; NULLs are `None`.
pub type Row = Vec<Option<String>>;

impl ReplicationClient {
    /// Connects, authenticates and waits for ReadyForQuery. Tries each target in turn.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let mut last_err = None;
        for target in &params.targets {
            match Self::connect_to(target, params).await {
                Ok(client) => return Ok(client),
                Err(err) if err.is_retryable() => last_err = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| ReplicationError::Protocol("no host to connect to".into())))
    }

    async fn connect_to(target: &Target, params: &ConnectParams) -> Result<Self, ReplicationError> {
        let connect = async {
            let io: Box<dyn Io> = match target {
                Target::Tcp { host, port } => {
                    let stream = TcpStream::connect((host.as_str(), *port)).await?;
                    stream.set_nodelay(true)?;
                    Box::new(stream)
                }
                Target::Unix { path } => Box::new(UnixStream::connect(path).await?),
            };
            Ok::<_, io::Error>(io)
        };
        let io = match tokio::time::timeout(params.connect_timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(source)) => {
                return Err(ReplicationError::Connect { target: target.to_string(), source });
            }
            Err(_) => {
                return Err(ReplicationError::Connect {
                    target: target.to_string(),
                    source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                });
            }
        };
        let mut client = Self {
            io,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            max_message_bytes: params.max_message_bytes,
        };
        client.startup(params).await?;
        Ok(client)
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        self.authenticate(params).await?;
        // ParameterStatus and BackendKeyData until ReadyForQuery.
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'Z' => return Ok(()),
                b'S' | b'K' | b'N' => {}
                b'E' => return Err(server_error(frame)),
                tag => return Err(unexpected(tag, "startup")),
            }
        }
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let password = || {
            params.password.clone().ok_or_else(|| {
                ReplicationError::Auth("the server asks for a password and none was given".into())
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            if frame.tag == b'E' {
                return Err(server_error(frame));
            }
            if frame.tag != b'R' {
                return Err(unexpected(frame.tag, "authentication"));
            }
            match parse(frame)? {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(&password()?, &mut self.write_buf)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(params.user.as_bytes(), &password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(mechanism) = mechanisms.next()? {
                        offered |= mechanism == SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(ReplicationError::Auth(
                            "the server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                        ));
                    }
                    // Channel binding needs TLS, which this client does not speak yet.
                    let state = ScramSha256::new(&password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        state.message(),
                        &mut self.write_buf,
                    )?;
                    scram = Some(state);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| unexpected(b'R', "SASL continue"))?;
                    state.update(body.data()).map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    frontend::sasl_response(state.message(), &mut self.write_buf)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| unexpected(b'R', "SASL final"))?;
                    state.finish(body.data()).map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    continue;
                }
                _ => {
                    return Err(ReplicationError::Auth(
                        "the server asks for an authentication method rowcast does not support \
                         (supported: trust, password, md5, scram-sha-256)"
                            .into(),
                    ));
                }
            }
            self.flush().await?;
        }
    }

    /// Runs one replication command with the simple query protocol and returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'D' => {
                    if let backend::Message::DataRow(row) = parse(frame)? {
                        let buf = row.buffer();
                        let mut ranges = row.ranges();
                        let mut values = Vec::new();
                        while let Some(range) = ranges.next()? {
                            values.push(match range {
                                Some(range) => {
                                    let raw = buf.get(range).ok_or_else(|| {
                                        ReplicationError::Protocol("data row out of bounds".into())
                                    })?;
                                    Some(String::from_utf8_lossy(raw).into_owned())
                                }
                                None => None,
                            });
                        }
                        rows.push(values);
                    }
                }
                b'T' | b'C' | b'N' | b'S' | b'I' => {}
                b'E' => error = Some(server_error(frame)),
                b'Z' => return error.map_or(Ok(rows), Err),
                tag => return Err(unexpected(tag, "simple query")),
            }
        }
    }

    /// Creates a logical slot using pgoutput. Returns false when it already exists.
    pub async fn create_slot(&mut self, slot: &str) -> Result<bool, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        match self.simple_query(&sql).await {
            Ok(_) => Ok(true),
            Err(ReplicationError::Server { code, .. }) if code == "42710" => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Starts streaming from `start` (the server starts from its confirmed position when that is
    /// later) and turns this client into a [`ReplicationStream`].
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            format_lsn(start),
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => break,
                b'N' | b'S' => {}
                b'E' => return Err(server_error(frame)),
                tag => return Err(unexpected(tag, "START_REPLICATION")),
            }
        }
        Ok(ReplicationStream { client: self, received: start })
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.io.write_all(&self.write_buf).await?;
        self.write_buf.clear();
        self.io.flush().await?;
        Ok(())
    }

    /// Reads one whole frame. Cancel safe: bytes read before a cancellation stay buffered.
    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            if self.io.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ReplicationError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the replication connection",
                )));
            }
        }
    }

    fn try_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        let Some(header) = self.read_buf.get(..5) else { return Ok(None) };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 {
            return Err(ReplicationError::Protocol(format!("frame length {len} is below 4")));
        }
        let total = len + 1;
        if total > self.max_message_bytes {
            return Err(ReplicationError::TooLarge { size: total, limit: self.max_message_bytes });
        }
        if self.read_buf.len() < total {
            self.read_buf.reserve(total - self.read_buf.len());
            return Ok(None);
        }
        Ok(Some(Frame { tag, bytes: self.read_buf.split_to(total) }))
    }
}

/// What the server sends while streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// A pgoutput message starting at `wal_start`; `wal_end` is the server's WAL end then.
    XLogData { wal_start: Lsn, wal_end: Lsn, data: Bytes },
    /// The server's position; `reply_requested` means answer now or be disconnected.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// The CopyBoth phase of a replication connection.
pub struct ReplicationStream {
    client: ReplicationClient,
    received: Lsn,
}

impl ReplicationStream {
    /// The next message from the server. Cancel safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            let frame = self.client.read_frame().await?;
            match frame.tag {
                b'd' => {
                    let mut body = frame.bytes.freeze();
                    body.advance(5);
                    let message = parse_copy_data(body)?;
                    match &message {
                        ReplicationMessage::XLogData { wal_start, .. } => {
                            self.received = self.received.max(*wal_start);
                        }
                        ReplicationMessage::Keepalive { wal_end, .. } => {
                            self.received = self.received.max(*wal_end);
                        }
                    }
                    return Ok(message);
                }
                b'N' | b'S' => {}
                b'E' => return Err(server_error(frame)),
                b'c' => {
                    return Err(ReplicationError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server ended the replication stream",
                    )));
                }
                tag => return Err(unexpected(tag, "streaming")),
            }
        }
    }

    /// Sends a standby status update: `flushed` is what the slot may forget.
    pub async fn send_status(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let pg_now = now.as_micros() as i64 - PG_EPOCH_OFFSET_MICROS;
        let written = self.received.max(flushed);
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(written);
        body.put_u64(flushed);
        body.put_u64(flushed);
        body.put_i64(pg_now);
        body.put_u8(u8::from(reply_requested));
        let buf = &mut self.client.write_buf;
        buf.put_u8(b'd');
        buf.put_u32(4 + body.len() as u32);
        buf.put_slice(&body);
        self.client.flush().await
    }

    /// Ends the stream politely so the walsender releases the slot at once.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.client.write_buf);
        frontend::terminate(&mut self.client.write_buf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

fn parse_copy_data(mut body: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let short = || ReplicationError::Protocol("copy data message is truncated".into());
    if body.is_empty() {
        return Err(short());
    }
    match body.get_u8() {
        b'w' => {
            if body.len() < 24 {
                return Err(short());
            }
            let wal_start = body.get_u64();
            let wal_end = body.get_u64();
            let _send_time = body.get_i64();
            Ok(ReplicationMessage::XLogData { wal_start, wal_end, data: body })
        }
        b'k' => {
            if body.len() < 17 {
                return Err(short());
            }
            let wal_end = body.get_u64();
            let _send_time = body.get_i64();
            let reply_requested = body.get_u8() == 1;
            Ok(ReplicationMessage::Keepalive { wal_end, reply_requested })
        }
        tag => Err(ReplicationError::Protocol(format!("unknown copy data kind {:?}", tag as char))),
    }
}

fn parse(frame: Frame) -> Result<backend::Message, ReplicationError> {
    let mut bytes = frame.bytes;
    backend::Message::parse(&mut bytes)?
        .ok_or_else(|| ReplicationError::Protocol("incomplete frame".into()))
}

fn server_error(frame: Frame) -> ReplicationError {
    let mut code = String::from("XX000");
    let mut message = String::from("unknown error");
    if let Ok(backend::Message::ErrorResponse(body)) = parse(frame) {
        let mut fields = body.fields();
        while let Ok(Some(field)) = fields.next() {
            match field.type_() {
                b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                _ => {}
            }
        }
    }
    ReplicationError::Server { code, message }
}

fn unexpected(tag: u8, phase: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected message {:?} during {phase}", tag as char))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_data_kinds() {
        let mut keepalive = BytesMut::new();
        keepalive.put_u8(b'k');
        keepalive.put_u64(42);
        keepalive.put_i64(7);
        keepalive.put_u8(1);
        match parse_copy_data(keepalive.freeze()) {
            Ok(ReplicationMessage::Keepalive { wal_end: 42, reply_requested: true }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let mut xlog = BytesMut::new();
        xlog.put_u8(b'w');
        xlog.put_u64(1);
        xlog.put_u64(2);
        xlog.put_i64(3);
        xlog.put_slice(b"B...");
        match parse_copy_data(xlog.freeze()) {
            Ok(ReplicationMessage::XLogData { wal_start: 1, wal_end: 2, data }) => {
                assert_eq!(&data[..], b"B...")
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in [&b""[..], b"k", b"w12345", b"z"] {
            assert!(parse_copy_data(Bytes::copy_from_slice(bad)).is_err());
        }
    }
}
