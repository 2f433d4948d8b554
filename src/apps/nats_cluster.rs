//! Throwaway NATS clusters for the tests and benchmarks of `--role publisher|gateway`, beside
//! the Postgres ones of [`super::cluster`].
//!
//! Each server runs from the machine's `nats-server` (`ROWCAST_NATS_SERVER`, or the first
//! found on `PATH`, `/usr/sbin`, `/usr/bin`) with JetStream, on free loopback ports, with its
//! store in a fresh temp directory; a cluster of more than one has routes between all of them.
//! Servers can be killed (`kill -9`) and started again on the same ports and store. Dropping
//! the [`NatsCluster`] kills every server and removes the directory; a small watchdog does the
//! same when this process dies without dropping it.
//!
//! The calls block (they wait for child processes and ports): from async code, use
//! `spawn_blocking` or accept a short block.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{ClusterError, free_port, io};

/// How long a starting server may take to report itself healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(50);

struct Server {
    name: String,
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

/// A running throwaway NATS cluster; see the module doc.
pub struct NatsCluster {
    dir: PathBuf,
    binary: PathBuf,
    servers: Vec<Server>,
}

/// The `nats-server` binary to run.
pub fn find_nats_server() -> Result<PathBuf, ClusterError> {
    if let Some(path) = std::env::var_os("ROWCAST_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| ClusterError::Io {
            action: "finding nats-server (install it, or set ROWCAST_NATS_SERVER)".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
}

impl NatsCluster {
    /// Starts `size` servers (routes between them when more than one) and waits until each
    /// reports JetStream healthy.
    pub fn start(size: usize) -> Result<NatsCluster, ClusterError> {
        let binary = find_nats_server()?;
        let dir = tempfile::Builder::new()
            .prefix("rowcast-nats-")
            .tempdir()
            .map_err(io("creating the NATS cluster directory"))?
            .keep();
        let mut cluster = NatsCluster { dir, binary, servers: Vec::new() };
        cluster.watch_for_exit();
        for i in 0..size.max(1) {
            cluster.servers.push(Server {
                name: format!("n{}", i + 1),
                port: free_port()?,
                cluster_port: free_port()?,
                monitor_port: free_port()?,
                child: None,
            });
        }
        for i in 0..cluster.servers.len() {
            cluster.write_config(i)?;
            cluster.launch(i)?;
        }
        for i in 0..cluster.servers.len() {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    /// `nats://127.0.0.1:PORT` of every server.
    pub fn urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    pub fn url(&self, server: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[server].port)
    }

    /// The index of the server named `name` (`n1`, `n2`, ... as JetStream reports leaders).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|server| server.name == name)
    }

    /// Every URL, comma-separated, as `--nats-url` takes them.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Kills server `server` with SIGKILL, as a crash would.
    pub fn kill(&mut self, server: usize) {
        if let Some(mut child) = self.servers[server].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on its ports and store, and waits until it is healthy.
    pub fn restart(&mut self, server: usize) -> Result<(), ClusterError> {
        self.kill(server);
        self.launch(server)?;
        self.wait_healthy(server)
    }

    fn write_config(&self, i: usize) -> Result<(), ClusterError> {
        let server = &self.servers[i];
        let store = self.dir.join(&server.name);
        let mut config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
             pid_file: \"{pid}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  max_file_store: 2GB\n}}\n",
            name = server.name,
            port = server.port,
            monitor = server.monitor_port,
            pid = self.dir.join(format!("{}.pid", server.name)).display(),
            store = store.display(),
        );
        if self.servers.len() > 1 {
            let routes: Vec<String> = self
                .servers
                .iter()
                .filter(|other| other.name != server.name)
                .map(|other| format!("nats-route://127.0.0.1:{}", other.cluster_port))
                .collect();
            config.push_str(&format!(
                "cluster {{\n  name: rowcast-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                server.cluster_port,
                routes.join(", ")
            ));
        }
        std::fs::write(self.config_path(i), config).map_err(io("writing a nats-server config"))
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.conf", self.servers[i].name))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.servers[i].name))
    }

    fn launch(&mut self, i: usize) -> Result<(), ClusterError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(io("opening a nats-server log"))?;
        let log_err = log.try_clone().map_err(io("opening a nats-server log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path(i))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        self.servers[i].child = Some(child);
        Ok(())
    }

    /// Waits until the server's monitoring endpoint says JetStream is healthy.
    fn wait_healthy(&mut self, i: usize) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let monitor = self.servers[i].monitor_port;
        loop {
            if healthz(monitor) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.servers[i].child.as_mut().map(Child::try_wait) {
                self.servers[i].child = None;
                return Err(ClusterError::Failed {
                    what: format!("nats-server {}", self.servers[i].name),
                    status,
                    output: std::fs::read_to_string(self.log_path(i)).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Io {
                    action: format!(
                        "waiting for nats-server {} to be healthy; see {}",
                        self.servers[i].name,
                        self.log_path(i).display()
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Kills the servers and removes the directory when this process ends, even by a crash.
    fn watch_for_exit(&self) {
        let stop = r#"for pid in "$2"/*.pid; do kill -9 "$(cat "$pid" 2>/dev/null)" 2>/dev/null; done
sleep 1"#;
        super::cluster::watch_for_exit(&self.dir, stop, "rowcast-nats-watchdog");
    }

    /// The directory of configs, logs and stores; gone once the cluster is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `GET /healthz?js-enabled-only=true` answered 200: the server runs with JetStream.
fn healthz(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = "GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
