//! The client end of a connection, watched while a `SUBSCRIBE` writes to it.
//!
//! A protocol handler only writes while a COPY runs, so a client that leaves an idle
//! subscription would go unnoticed until the next event fails to write. The session keeps a
//! second handle on the socket (a duplicate of its descriptor) and peeks at it: the end of the
//! stream, or a Terminate message among what the client sent, means it is gone. The end is not
//! seen behind input the client sent and nobody read yet (tokio-postgres closes its statement
//! during a COPY); such a client, and one that vanished without a word, is noticed when a write
//! fails: the subscription writes a `ParameterStatus` (`rowcast.resume_id`) every
//! `--ping-interval` it has nothing else to write, and the second write after the client left
//! fails.
//!
//! A subscription that can say nothing more (the client left, or its socket takes nothing for
//! `--write-timeout`) abandons the connection: the server drops it instead of writing an error
//! into a socket nobody reads.

use std::io::ErrorKind;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a subscription checks whether its client is still there.
const PEEK_INTERVAL: Duration = Duration::from_millis(250);
/// Bytes of unread client input looked through for a Terminate message.
const PEEK_BYTES: usize = 4096;
/// The frontend message that ends a session.
const TERMINATE: u8 = b'X';

pub struct Peer {
    /// A duplicate of the connection's socket, for peeking only; `None` if it could not be had.
    socket: Option<std::net::TcpStream>,
    abandoned: CancellationToken,
}

impl Peer {
    /// Takes a second handle on `stream`'s socket; returns the stream to serve.
    pub fn watch(stream: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, Peer)> {
        let std = stream.into_std()?;
        let socket = std.try_clone().ok();
        let stream = tokio::net::TcpStream::from_std(std)?;
        Ok((stream, Peer { socket, abandoned: CancellationToken::new() }))
    }

    /// Resolves once the client is seen gone.
    pub async fn gone(&self) {
        let Some(socket) = &self.socket else { return std::future::pending().await };
        let mut buffer = vec![0u8; PEEK_BYTES];
        loop {
            tokio::time::sleep(PEEK_INTERVAL).await;
            // The descriptor is non-blocking (tokio's), so a peek never waits.
            match socket.peek(&mut buffer) {
                Ok(0) => return,
                Ok(n) if terminates(&buffer[..n]) => return,
                Ok(_) => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Asks the server to drop the connection without another word.
    pub fn abandon(&self) {
        self.abandoned.cancel();
    }

    /// Resolves once the connection is abandoned.
    pub async fn abandoned(&self) {
        self.abandoned.cancelled().await;
    }
}

/// Whether the client input `bytes` (whole messages first, perhaps a partial one last) holds a
/// Terminate message.
fn terminates(bytes: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        if header[0] == TERMINATE {
            return true;
        }
        let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let Ok(length) = usize::try_from(length) else { return false };
        if length < 4 {
            return false;
        }
        at = at.saturating_add(1 + length);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminate_behind_other_messages_is_found() {
        let sync = [b'S', 0, 0, 0, 4];
        let terminate = [b'X', 0, 0, 0, 4];
        assert!(terminates(&terminate));
        assert!(terminates(&[sync.as_slice(), terminate.as_slice()].concat()));
        assert!(!terminates(&sync));
        assert!(!terminates(&[b'S', 0xff, 0xff, 0xff, 0xff, b'X', 0, 0, 0, 4]));
        assert!(!terminates(&[b'Q', 0, 0]));
        assert!(!terminates(&[]));
    }
}
