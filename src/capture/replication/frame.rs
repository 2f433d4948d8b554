//! Our framing (see the module doc): whole backend frames cut from the read buffer, within
//! `max_message_bytes`, and the write buffer flushed to the socket.

use std::io;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ReplicationClient, ReplicationError};

/// A complete backend frame: its tag and its whole bytes (header included, as
/// postgres-protocol's parser wants them).
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) bytes: BytesMut,
}

impl ReplicationClient {
    pub(super) async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.io.write_all(&self.write_buf).await?;
        self.write_buf.clear();
        self.io.flush().await?;
        Ok(())
    }

    /// Reads one whole frame. Cancel safe: bytes read before a cancellation stay buffered.
    pub(super) async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
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

pub(super) fn parse(frame: Frame) -> Result<backend::Message, ReplicationError> {
    let mut bytes = frame.bytes;
    backend::Message::parse(&mut bytes)?
        .ok_or_else(|| ReplicationError::Protocol("incomplete frame".into()))
}

pub(super) fn server_error(frame: Frame) -> ReplicationError {
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

pub(super) fn unexpected(tag: u8, phase: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected message {:?} during {phase}", tag as char))
}
