//! Support for the scaled roles (SPEC §10): a throwaway NATS cluster per test, settings for
//! publishers and gateways, `rowcast serve` processes that can be killed with SIGKILL, and a
//! reader of what the stream holds.

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use futures_util::StreamExt;
use rowcast::apps::nats_cluster::NatsCluster;
use rowcast::config::{NatsSettings, Role, Settings};
use serde_json::Value;

use super::TestDb;
use super::client::{get, get_status};

/// `size` NATS servers with JetStream (routes between them when more than one).
pub fn cluster(size: usize) -> NatsCluster {
    NatsCluster::start(size).expect("start a NATS cluster (is nats-server installed?)")
}

/// The NATS settings of a test: every server of `nats`, one copy of the stream per server.
pub fn nats_settings(nats: &NatsCluster) -> NatsSettings {
    let urls = nats.urls();
    NatsSettings { replicas: urls.len().min(3), urls, ..NatsSettings::default() }
}

/// The settings of `db` for `role` over `nats`.
pub fn settings(db: &TestDb, role: Role, nats: &NatsCluster) -> Settings {
    let mut settings = db.settings();
    settings.role = role;
    settings.nats = nats_settings(nats);
    settings
}

/// A `rowcast serve` process; killed with SIGKILL when dropped.
pub struct Process {
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Process {
    /// `rowcast serve --role ROLE` for `db` over the NATS servers `nats_urls` on a free port,
    /// with `extra` flags.
    pub fn serve(db: &TestDb, role: Role, nats_urls: &str, extra: &[&str]) -> Process {
        Self::serve_on(super::free_addr(), db, role, nats_urls, extra)
    }

    /// [`Process::serve`] on `addr` (a restart where the last one listened).
    pub fn serve_on(
        addr: SocketAddr,
        db: &TestDb,
        role: Role,
        nats_urls: &str,
        extra: &[&str],
    ) -> Process {
        let listen = addr.to_string();
        let mut args = vec![
            "serve",
            "--role",
            role.name(),
            "--nats-url",
            nats_urls,
            "--listen",
            &listen,
            "--slot",
            &db.name,
            "--status-interval",
            "500ms",
            "--message-rate",
            "10000",
            "--message-burst",
            "10000",
        ];
        let replicas = (nats_urls.split(',').count().min(3)).to_string();
        args.extend(["--nats-replicas", &replicas]);
        args.extend(extra);
        let child = super::rowcast_command(&db.url, &args).spawn().expect("spawn rowcast serve");
        Process { addr, child: Some(child) }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let ready = super::ready_within(self.addr, timeout).await;
        assert!(ready, "rowcast at {} not ready within {timeout:?}", self.addr);
    }

    pub async fn stats(&self) -> Value {
        stats(self.addr).await
    }

    /// Waits until stats say `state` (`streaming`, `standby`, ...); how long that took.
    pub async fn until_state(&self, state: &str, timeout: Duration) -> Duration {
        let started = std::time::Instant::now();
        loop {
            let stats = self.stats().await;
            if stats["state"] == state {
                return started.elapsed();
            }
            assert!(started.elapsed() < timeout, "still {} after {timeout:?}", stats["state"]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A POST that may find nobody: `None` when the connection fails.
pub async fn try_post(addr: SocketAddr, path: &str, body: &[u8]) -> Option<(u16, Value)> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.write_all(body).await.ok()?;
    let read = tokio::time::timeout(Duration::from_secs(30), read_response_checked(stream));
    read.await.ok().flatten()
}

/// [`super::client::read_response`] without panicking on a connection that drops.
async fn read_response_checked(mut stream: tokio::net::TcpStream) -> Option<(u16, Value)> {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8(response).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /api/events/stats`, or `null` when nothing answers.
pub async fn stats(addr: SocketAddr) -> Value {
    if get_status(addr, "/healthz").await != Some(200) {
        return Value::Null;
    }
    get(addr, "/api/events/stats").await.1
}

/// Every message id the stream `settings.stream` holds, in stream order.
pub async fn stream_ids(settings: &NatsSettings) -> Vec<u64> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let client = async_nats::connect(settings.urls.as_slice()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&settings.stream).await.expect("the stream");
    let last = stream.info().await.expect("stream info").state.last_sequence;
    let mut ids = Vec::new();
    if last == 0 {
        return ids;
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(10), messages.next()).await
    {
        let message = message.expect("a message");
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(rowcast::nats::message::MESSAGE_ID))
            .and_then(|id| id.as_str().parse().ok())
            .expect("every message has its event id");
        ids.push(id);
        if message.info().expect("info").stream_sequence >= last {
            break;
        }
    }
    ids
}

/// The server name of the stream's leader (`n1`, ...), asked through `url`.
pub async fn stream_leader(url: &str, stream: &str) -> Option<String> {
    let client = async_nats::connect(url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.ok()?;
    stream.info().await.ok()?.cluster.as_ref()?.leader.clone()
}
