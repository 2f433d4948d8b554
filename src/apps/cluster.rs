//! Throwaway Postgres clusters started from the machine's own binaries, for `rowcast demo` and
//! the test suite.
//!
//! Each cluster lives in a fresh temp directory with `wal_level=logical`, on a free port, and
//! runs as the `postgres` user when this process runs as root (initdb refuses root). It runs in
//! its own process group, so a Ctrl-C in the terminal reaches rowcast, which shuts down in
//! order, and not the server underneath it. Dropping the [`Cluster`] stops it and removes its
//! directory; a small watchdog process does the same when this process dies without dropping
//! it (a crash, `kill -9`).
//!
//! The calls block (they wait for child processes): from async code, use `spawn_blocking`.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where distribution packages (Debian, Ubuntu) install the server binaries, one folder per
/// major version.
const PACKAGED_BINARIES: &str = "/usr/lib/postgresql";

/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is checked meanwhile.
const READY_POLL: Duration = Duration::from_millis(50);
/// Lines of the server log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no Postgres server binaries found in {PACKAGED_BINARIES}/*/bin; install postgresql or set ROWCAST_PG_BIN to the folder holding initdb and postgres"
    )]
    NoBinaries,
    #[error("ROWCAST_PG_BIN={0:?} holds no initdb")]
    BadBinaries(PathBuf),
    #[error("{action}: {source}")]
    Io { action: String, source: std::io::Error },
    #[error("{what} failed ({status}):\n{output}")]
    Failed { what: String, status: ExitStatus, output: String },
    #[error("postgres exited while starting ({status}); the end of {log:?}:\n{tail}")]
    Exited { status: ExitStatus, log: PathBuf, tail: String },
    #[error("postgres did not accept connections within {}s; see {log:?}", READY_TIMEOUT.as_secs())]
    NotReady { log: PathBuf },
}

pub(crate) fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let action = action.into();
    move |source| ClusterError::Io { action, source }
}

/// A running throwaway cluster; dropping it stops the server and removes its directory.
pub struct Cluster {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    postmaster: Option<Child>,
    extra: Vec<(String, String)>,
}

/// The folder of `initdb` and `postgres`: `ROWCAST_PG_BIN`, or the newest packaged version.
pub fn find_binaries() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("ROWCAST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").exists() {
            Ok(dir)
        } else {
            Err(ClusterError::BadBinaries(dir))
        };
    }
    let mut versions: Vec<u32> = std::fs::read_dir(PACKAGED_BINARIES)
        .map(|dirs| {
            dirs.filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
                .filter(|v: &u32| {
                    Path::new(&format!("{PACKAGED_BINARIES}/{v}/bin/initdb")).exists()
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    versions
        .last()
        .map(|v| PathBuf::from(format!("{PACKAGED_BINARIES}/{v}/bin")))
        .ok_or(ClusterError::NoBinaries)
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// Starts a new cluster; `extra` are additional `-c name=value` settings.
    pub fn start(extra: &[(&str, &str)]) -> Result<Cluster, ClusterError> {
        Self::start_with_hba(extra, None)
    }

    /// Starts a new cluster whose `pg_hba.conf` is `hba` (trust for everything by default).
    pub fn start_with_hba(
        extra: &[(&str, &str)],
        hba: Option<&str>,
    ) -> Result<Cluster, ClusterError> {
        let bin = find_binaries()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("rowcast-pg-")
            .tempdir()
            .map_err(io("creating the cluster directory"))?
            .keep();
        // From here on, dropping `cluster` removes the directory, also on the error paths.
        let mut cluster = Cluster {
            port: free_port()?,
            dir,
            bin,
            as_postgres,
            postmaster: None,
            extra: extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        cluster.watch_for_exit();
        if as_postgres {
            let output = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.dir)
                .output()
                .map_err(io("running chown"))?;
            if !output.status.success() {
                return Err(ClusterError::Failed {
                    what:
                        "handing the cluster directory to the postgres user (initdb refuses root)"
                            .into(),
                    status: output.status,
                    output: String::from_utf8_lossy(&output.stderr).into_owned(),
                });
            }
        }
        let data = cluster.dir.join("data");
        let output = cluster
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "-D"])
            .arg(&data)
            .output()
            .map_err(io(format!("running {}", cluster.bin.join("initdb").display())))?;
        if !output.status.success() {
            return Err(ClusterError::Failed {
                what: "initdb".into(),
                status: output.status,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            });
        }
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).map_err(io("writing pg_hba.conf"))?;
        }
        cluster.launch()?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data, log and socket); gone once the cluster is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of `database` as the superuser `postgres` (trust authentication).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of `database` over the cluster's Unix-domain socket, as `url` otherwise.
    pub fn socket_url(&self, database: &str) -> String {
        format!(
            "postgres:///{database}?host={}&port={}&user=postgres",
            self.dir.display(),
            self.port
        )
    }

    /// Stops the server as a crash would (immediate mode) and starts it again.
    pub fn restart_immediate(&mut self) -> Result<(), ClusterError> {
        self.stop_immediate();
        self.launch()
    }

    /// Stops the server with a fast shutdown (`pg_ctl stop -m fast`: sessions are ended,
    /// walsenders end their streams) and starts it again.
    pub fn restart_fast(&mut self) -> Result<(), ClusterError> {
        if let Some(mut child) = self.postmaster.take() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
        self.launch()
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("setpriv");
            command.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        };
        command.process_group(0);
        command
    }

    fn launch(&mut self) -> Result<(), ClusterError> {
        let log_path = self.dir.join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening postgres.log"))?;
        let log_err = log.try_clone().map_err(io("opening postgres.log"))?;
        let mut command = self.command("postgres");
        command.arg("-D").arg(self.dir.join("data")).args(["-p", &self.port.to_string()]);
        let socket_dir = self.dir.to_string_lossy().into_owned();
        let defaults = [
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", socket_dir.as_str()),
            ("wal_level", "logical"),
            ("max_replication_slots", "64"),
            ("max_wal_senders", "64"),
            ("max_connections", "300"),
            // Throwaway data: durability buys nothing here.
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "64MB"),
            ("wal_sender_timeout", "60s"),
        ];
        let extra = self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in defaults.into_iter().chain(extra) {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!("starting {}", self.bin.join("postgres").display())))?;
        self.postmaster = Some(child);
        self.wait_ready(&log_path)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            let exited = match self.postmaster.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            if let Some(status) = exited {
                self.postmaster = None;
                return Err(ClusterError::Exited {
                    status,
                    log: log.to_owned(),
                    tail: tail(log, LOG_TAIL_LINES),
                });
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady { log: log.to_owned() });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Removes the cluster when this process ends, even by a crash.
    fn watch_for_exit(&self) {
        let stop = r#"kill -QUIT "$(head -1 "$2/data/postmaster.pid" 2>/dev/null)" 2>/dev/null
sleep 2"#;
        watch_for_exit(&self.dir, stop, "rowcast-cluster-watchdog");
    }

    fn stop_immediate(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            // Immediate shutdown (SIGQUIT): the fastest stop, and what a crash looks like.
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_immediate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a watchdog outside this process's session: once this process has ended, by a crash
/// too, it runs `stop` (shell; `$2` is `dir`) and removes `dir`. `name` is its process name.
pub(crate) fn watch_for_exit(dir: &Path, stop: &str, name: &str) {
    // Paths go in as arguments, never into the script text: no quoting problems.
    let script =
        format!("while kill -0 \"$1\" 2>/dev/null; do sleep 1; done\n{stop}\nrm -rf \"$2\"");
    let spawned = Command::new("setsid")
        .args(["sh", "-c", &script, name])
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(err) = spawned {
        tracing::warn!(error = %err, dir = %dir.display(), "no watchdog; a crash would leave servers and the directory behind");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\n").expect("write");
        assert_eq!(tail(&path, 2), "b\nc");
        assert_eq!(tail(&path, 10), "a\nb\nc");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }
}
