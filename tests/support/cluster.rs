//! Throwaway Postgres clusters started from the machine's own binaries.
//!
//! Each cluster lives in a fresh temp directory with `wal_level=logical`, on a free port, and
//! runs as the `postgres` user when the tests run as root (initdb refuses root). A small
//! watchdog process removes it when the test process exits, however it exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    postmaster: Option<Child>,
    extra: Vec<(String, String)>,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ROWCAST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
                .filter(|v: &u32| {
                    Path::new(&format!("/usr/lib/postgresql/{v}/bin/initdb")).exists()
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    match versions.last() {
        Some(v) => PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")),
        None => panic!("no Postgres server binaries found (set ROWCAST_PG_BIN)"),
    }
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

impl Cluster {
    /// Starts a new cluster; `extra` are additional `-c name=value` settings.
    pub fn start(extra: &[(&str, &str)]) -> Cluster {
        Self::start_with_hba(extra, None)
    }

    /// Starts a new cluster whose `pg_hba.conf` is `hba` (trust for everything by default).
    pub fn start_with_hba(extra: &[(&str, &str)], hba: Option<&str>) -> Cluster {
        let bin = bin_dir();
        let as_postgres = running_as_root();
        let dir =
            tempfile::Builder::new().prefix("rowcast-pg-").tempdir().expect("temp dir").keep();
        if as_postgres {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {}", dir.display());
        }
        let mut cluster = Cluster {
            port: free_port(),
            dir,
            bin,
            as_postgres,
            postmaster: None,
            extra: extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let data = cluster.dir.join("data");
        let output = cluster
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        }
        cluster.watch_for_exit();
        cluster.launch();
        cluster
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("setpriv");
            command.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .expect("log file");
        let mut command = self.command("postgres");
        command.arg("-D").arg(self.dir.join("data")).args(["-p", &self.port.to_string()]);
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", self.dir.to_str().expect("utf-8 path")),
            ("wal_level", "logical"),
            ("max_replication_slots", "64"),
            ("max_wal_senders", "64"),
            ("max_connections", "300"),
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "64MB"),
            ("wal_sender_timeout", "60s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        settings.extend(self.extra.iter().cloned());
        for (name, value) in &settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.postmaster = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start; see {}",
                self.dir.join("postgres.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the cluster when this process ends, even by a crash.
    fn watch_for_exit(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             kill -QUIT $(head -1 {dir}/data/postmaster.pid 2>/dev/null) 2>/dev/null; sleep 2; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server as a crash would (immediate mode) and starts it again.
    pub fn restart_immediate(&mut self) {
        self.stop_immediate();
        self.launch();
    }

    fn stop_immediate(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
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
