//! Real clients for the server under test: a WebSocket client speaking SPEC §5 and a minimal
//! HTTP/1.1 GET.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct Ws {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read ahead (by `subscribe`, waiting for its reply) and not yet returned.
    pending: std::collections::VecDeque<Value>,
}

/// What arrived next.
#[derive(Debug)]
pub enum Incoming {
    Frame(Value),
    Closed(Option<CloseFrame>),
}

/// How a connection ended, for a client that read it to the end.
#[derive(Debug)]
pub enum Ending {
    /// A close frame; `None` if it had no code.
    Closed(Option<CloseFrame>),
    /// The connection ended without a close frame: the server dropped it.
    Aborted(String),
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");
        Ws::new(socket)
    }

    pub fn new(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Ws {
        Ws { socket, pending: Default::default() }
    }

    /// Connects with a receive buffer of about `bytes`: a client whose socket fills up at once
    /// when it does not read.
    pub async fn connect_small(addr: SocketAddr, url: &str, bytes: u32) -> Ws {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("rcvbuf");
        let stream = socket.connect(addr).await.expect("connect");
        let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
        Ws::new(socket)
    }

    /// Every text frame until the connection ends, and how it ended; panics after `silence`
    /// with nothing new.
    pub async fn read_to_end(&mut self, silence: Duration) -> (Vec<Value>, Ending) {
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        loop {
            let message =
                tokio::time::timeout(silence, self.socket.next()).await.unwrap_or_else(|_| {
                    panic!("nothing for {silence:?} after {} frames", frames.len())
                });
            match message {
                Some(Ok(Message::Text(text))) => {
                    frames.push(serde_json::from_str(text.as_str()).expect("frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => return (frames, Ending::Closed(frame)),
                Some(Ok(_)) => {}
                Some(Err(err)) => return (frames, Ending::Aborted(err.to_string())),
                None => return (frames, Ending::Aborted("end of stream".into())),
            }
        }
    }

    /// Connects and reads the welcome; returns the client and `welcome.last_id`.
    pub async fn connect_welcomed(url: &str) -> (Ws, u64) {
        let mut ws = Ws::connect(url).await;
        let welcome = ws.frame().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let last_id = welcome["last_id"].as_u64().expect("welcome.last_id");
        (ws, last_id)
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket.send(Message::text(frame.to_string())).await.expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send");
    }

    /// The next text frame or the close, within `timeout`; `None` on timeout. Pings and other
    /// non-text messages do not extend the wait.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Incoming> {
        if let Some(frame) = self.pending.pop_front() {
            return Some(Incoming::Frame(frame));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next()).await.ok()?;
            match message {
                None => return Some(Incoming::Closed(None)),
                Some(Err(err)) => panic!("websocket error: {err}"),
                Some(Ok(Message::Text(text))) => {
                    let value = serde_json::from_str(text.as_str()).expect("frames are JSON");
                    return Some(Incoming::Frame(value));
                }
                Some(Ok(Message::Close(frame))) => return Some(Incoming::Closed(frame)),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next text frame; panics on close or after 30 s.
    pub async fn frame(&mut self) -> Value {
        match self.next_within(Duration::from_secs(30)).await {
            Some(Incoming::Frame(value)) => value,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Skips frames until one of `kind`; returns it.
    pub async fn until(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.frame().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Subscribes and returns `(subscription_id, last_id)` from `subscribed`.
    pub async fn subscribe(&mut self, filter: Value, since: Option<u64>) -> (String, u64) {
        let mut request = serde_json::json!({"action": "subscribe", "filter": filter});
        if let Some(since) = since {
            request["since"] = since.into();
        }
        self.send(request).await;
        // Events of the connection's other subscriptions may come first: kept for `frame`.
        let mut ahead = Vec::new();
        let reply = loop {
            let frame = self.frame().await;
            if !is_event(&frame) {
                break frame;
            }
            ahead.push(frame);
        };
        self.pending.extend(ahead);
        assert_eq!(reply["type"], "subscribed", "{reply}");
        (
            reply["subscription_id"].as_str().expect("id").to_owned(),
            reply["last_id"].as_u64().expect("last_id"),
        )
    }

    /// Frames up to and including the first of type `kind`.
    pub async fn through(&mut self, kind: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.frame().await;
            let done = frame["type"] == kind;
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Every frame up to (not including) the pong answering a ping sent now: since frames
    /// are written in order, this is everything the server had queued for us.
    pub async fn drain(&mut self) -> Vec<Value> {
        self.send(serde_json::json!({"action": "ping", "ref": "drain"})).await;
        let mut frames = Vec::new();
        loop {
            let frame = self.frame().await;
            if frame["type"] == "pong" && frame["ref"] == "drain" {
                return frames;
            }
            frames.push(frame);
        }
    }
}

/// Whether a frame is an event (its type has a dot).
pub fn is_event(frame: &Value) -> bool {
    frame["type"].as_str().is_some_and(|t| t.contains('.'))
}

/// The status of a GET, or `None` when nothing answers.
pub async fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let head = String::from_utf8_lossy(&response);
    head.split(' ').nth(1)?.parse().ok()
}

/// A GET; returns the status and the body as JSON (or a string when it is not JSON).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("http connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("http write");
    read_response(stream).await
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// A POST of `body` (JSON) with an optional bearer token; returns the status and the body as
/// JSON (or a string when it is not JSON).
pub async fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("http connect");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("http write");
    stream.write_all(body).await.expect("http write");
    read_response(stream).await
}

/// Reads a whole response off `stream`.
pub async fn read_response(mut stream: TcpStream) -> (u16, Value) {
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("http read");
    let text = String::from_utf8(response).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}
