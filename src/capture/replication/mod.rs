//! A logical replication client that speaks the streaming replication protocol itself.
//!
//! ```text
//! SSLRequest -> TLS (as sslmode says; over TCP only)
//!   -> startup (replication=database, UTC/ISO session) -> auth (trust | cleartext | md5 | SCRAM)
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
//!
//! `params.rs` says where and as whom to connect, `transport.rs` opens the (TLS) stream,
//! `frame.rs` cuts the byte stream into frames, and `streaming.rs` is the CopyBoth phase that
//! `start_replication` hands over to.

mod frame;
mod params;
mod streaming;
mod transport;

use std::io;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend, frontend};

use self::frame::{parse, server_error, unexpected};
pub use self::params::{Address, ConnectParams};
pub use self::streaming::{ReplicationMessage, ReplicationStream};
use self::transport::Io;
use crate::pg::{Lsn, TlsError, Transience, format_lsn, quote_ident, quote_literal};

pub use crate::model::PG_EPOCH_OFFSET_MICROS;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("connecting to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("TLS to {target}: {source}")]
    Tls { target: String, source: Box<TlsError> },
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    #[error("server said {code}: {message}")]
    Server { code: String, message: String },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
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
            // A handshake cut short may pass; a certificate that fails its checks will not.
            Self::Tls { source, .. } => source.is_retryable(),
            // A slot held by a dying session (55006) or a server restarting pass; bad
            // credentials, a missing object, wal_level not logical, removed WAL do not.
            Self::Server { code, .. } => {
                crate::pg::sqlstate_transience(code) == Transience::Transient
            }
            Self::Auth(_) => false,
            // These would fail again at the same position after a reconnect.
            Self::Protocol(_) | Self::TooLarge { .. } => false,
        }
    }
}

/// One replication connection: a socket, a read buffer and our own framing.
pub struct ReplicationClient {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    max_message_bytes: usize,
}

/// One row of a simple-query result; NULLs are `None`.
pub type Row = Vec<Option<String>>;

impl ReplicationClient {
    /// Connects, authenticates and waits for ReadyForQuery. Tries each address in turn.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let mut last_err = None;
        for address in &params.addresses {
            match Self::connect_to(address, params).await {
                Ok(client) => return Ok(client),
                Err(err) if err.is_retryable() => last_err = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| ReplicationError::Protocol("no host to connect to".into())))
    }

    async fn connect_to(
        address: &Address,
        params: &ConnectParams,
    ) -> Result<Self, ReplicationError> {
        let io = transport::open(address, params).await?;
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
        ];
        let output = crate::capture::render::OUTPUT_SETTINGS;
        frontend::startup_message(
            startup.iter().chain(output.iter()).copied(),
            &mut self.write_buf,
        )?;
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
                    // No channel binding (tls-server-end-point) here, even over TLS: the
                    // certificate is checked as sslmode says, and SCRAM still proves both sides.
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
}
