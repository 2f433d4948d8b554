//! With `--features testcontainers`: the shared test server is a `postgres` container started
//! with the docker CLI, for machines that have a Docker engine but no Postgres binaries.
//!
//! This path cannot run on machines without a Docker engine (the CI machine has none), so it is
//! only compiled there. Tests that own their cluster (a restart, a custom pg_hba.conf) still
//! use the local binaries.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "postgres:16";

/// Starts the container and returns its admin URL; it is removed when this process exits.
pub fn start() -> String {
    let output = Command::new("docker")
        .args([
            "run",
            "-d",
            "--rm",
            "-p",
            "127.0.0.1::5432",
            "-e",
            "POSTGRES_HOST_AUTH_METHOD=trust",
            IMAGE,
        ])
        .args([
            "-c",
            "wal_level=logical",
            "-c",
            "max_replication_slots=64",
            "-c",
            "max_wal_senders=64",
        ])
        .args(["-c", "max_connections=300", "-c", "fsync=off"])
        .output()
        .expect("run docker");
    assert!(output.status.success(), "docker run: {}", String::from_utf8_lossy(&output.stderr));
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; docker rm -f {id}",
        std::process::id()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn();
    let port =
        Command::new("docker").args(["port", &id, "5432/tcp"]).output().expect("docker port");
    let address =
        String::from_utf8_lossy(&port.stdout).lines().next().unwrap_or_default().trim().to_owned();
    let url = format!("postgres://postgres@{address}/postgres");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !Command::new("docker")
        .args(["exec", &id, "pg_isready", "-U", "postgres", "-h", "127.0.0.1"])
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(Instant::now() < deadline, "container {id} did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    url
}
