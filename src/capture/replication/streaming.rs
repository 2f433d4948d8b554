//! The CopyBoth phase: XLogData and keepalives in, standby status updates out.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;

use super::frame::{server_error, unexpected};
use super::{PG_EPOCH_OFFSET_MICROS, ReplicationClient, ReplicationError};
use crate::pg::Lsn;

/// How long the goodbye to the walsender (CopyDone, Terminate) may take to be written.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub(super) client: ReplicationClient,
    pub(super) received: Lsn,
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
                // CopyDone, or (a fast shutdown of a caught-up walsender) CommandComplete or
                // ReadyForQuery without one: the server ended the stream; reconnecting resumes.
                b'c' | b'C' | b'Z' => {
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
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.client.flush()).await;
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
