//! The byte stream under a replication connection: TCP or a Unix-domain socket, and over TCP
//! the SSLRequest libpq sends before the startup message, then TLS when the server agrees
//! ('S') or plain when it refuses ('N') and `sslmode` allows that. All of it, handshake
//! included, happens within `connect_timeout`: a server that never answers cannot hang us.

use std::io;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{Address, ConnectParams, ReplicationError};
use crate::pg::{SslMode, Tls, TlsError};

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens the stream to `address`, encrypted as `params.tls` says.
pub(super) async fn open(
    address: &Address,
    params: &ConnectParams,
) -> Result<Box<dyn Io>, ReplicationError> {
    let failed =
        |source: io::Error| ReplicationError::Connect { target: address.to_string(), source };
    let opening = async {
        match address {
            Address::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await.map_err(failed)?;
                stream.set_nodelay(true).map_err(failed)?;
                secure(stream, address, host, &params.tls).await
            }
            // Postgres has no TLS on Unix-domain sockets; libpq ignores sslmode there.
            Address::Unix { path } => {
                Ok(Box::new(UnixStream::connect(path).await.map_err(failed)?) as Box<dyn Io>)
            }
        }
    };
    match tokio::time::timeout(params.connect_timeout, opening).await {
        Ok(opened) => opened,
        Err(_) => Err(failed(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no connection within {}s (connect_timeout), TLS handshake included",
                params.connect_timeout.as_secs_f32()
            ),
        ))),
    }
}

/// SSLRequest, then TLS on 'S'; on 'N', plain if `sslmode` allows it.
async fn secure(
    mut stream: TcpStream,
    address: &Address,
    host: &str,
    tls: &Tls,
) -> Result<Box<dyn Io>, ReplicationError> {
    if tls.mode == SslMode::Disable {
        return Ok(Box::new(stream));
    }
    let failed =
        |source: io::Error| ReplicationError::Connect { target: address.to_string(), source };
    let refused = |source: TlsError| ReplicationError::Tls {
        target: address.to_string(),
        source: Box::new(source),
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await.map_err(failed)?;
    // Exactly one byte: anything after it belongs to the TLS handshake, never to us.
    let answer = stream.read_u8().await.map_err(failed)?;
    match answer {
        b'S' => Ok(Box::new(tls.handshake(stream, host).await.map_err(refused)?)),
        b'N' if !tls.required() => Ok(Box::new(stream)),
        b'N' => Err(refused(TlsError::Refused { host: host.to_owned(), mode: tls.mode })),
        other => Err(ReplicationError::Protocol(format!(
            "the server answered SSLRequest with {:?}, not 'S' or 'N'",
            char::from(other)
        ))),
    }
}
