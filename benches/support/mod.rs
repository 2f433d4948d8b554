//! What the benchmarks share: positional arguments, Postgres clients and a `rowcast serve`.

// Each benchmark compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `index`-th positional argument after `--`, or `default`.
pub fn arg(index: usize, default: usize) -> usize {
    std::env::args()
        .filter(|a| !a.starts_with('-'))
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// A client whose connection runs in the background.
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// A `rowcast serve` child process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `rowcast serve` (with `extra` flags) on a free port against `url`, and waits until it
/// is ready.
pub async fn start_server(url: &str, extra: &[&str]) -> Server {
    let port = rowcast::apps::cluster::free_port().expect("a free port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["serve", "--listen", &addr.to_string(), "--status-interval", "1s"])
        .args(extra)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("rowcast serve (build it with cargo bench)");
    let server = Server { child, addr };
    let admin = client(url).await;
    for _ in 0..600 {
        // Slot creation waits for running transactions; a checkpoint lets it finish at once.
        let _ = admin.batch_execute("CHECKPOINT").await;
        if ready(addr).await {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("rowcast serve never became ready");
}

async fn ready(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    response.starts_with(b"HTTP/1.1 200")
}
