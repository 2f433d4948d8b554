//! What the benchmarks share: positional arguments, Postgres clients and a `rowcast serve`.

// Each benchmark compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `index`-th positional argument after `--`, or `default`.
pub fn arg(index: usize, default: usize) -> usize {
    std::env::args()
        .filter(|a| !a.starts_with('-'))
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// Holds a writer to its share of `rate` changes per second: it sleeps until its `done`-th
/// change is due, `writers` writers having started together at `started`.
pub async fn pace(started: Instant, done: usize, writers: usize, rate: f64) {
    let due = Duration::from_secs_f64((done * writers) as f64 / rate);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::time::sleep(wait).await;
    }
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
    let server = spawn_server(url, extra);
    server.wait_ready(&client(url).await).await;
    server
}

/// Starts `rowcast serve` (with `extra` flags) on a free port against `url`, without waiting.
pub fn spawn_server(url: &str, extra: &[&str]) -> Server {
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
    Server { child, addr }
}

impl Server {
    /// Waits until `/readyz` answers 200; `admin` checkpoints meanwhile.
    pub async fn wait_ready(&self, admin: &tokio_postgres::Client) {
        for _ in 0..600 {
            // Slot creation waits for running transactions; a checkpoint lets it finish at once.
            let _ = admin.batch_execute("CHECKPOINT").await;
            if ready(self.addr).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("rowcast serve at {} never became ready", self.addr);
    }

    /// User + system CPU seconds the server has used.
    pub fn cpu(&self) -> f64 {
        cpu_seconds(self.child.id())
    }
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

/// User + system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid, false) as f64 / clock_ticks()
}

/// The CPU ticks of a process (utime, stime), and with `reaped` those of its ended children too.
pub fn cpu_ticks(pid: u32, reaped: bool) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12) + if reaped { field(13) + field(14) } else { 0 }
}

/// Clock ticks per second, the unit of `/proc/PID/stat` times (asked of `getconf` once).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

pub fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros() as i64
}

/// The `p` quantile of sorted microseconds, in milliseconds (NaN when there are none).
pub fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}
