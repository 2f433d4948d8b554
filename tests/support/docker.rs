//! With `--features testcontainers`: the shared test server is a Postgres container started with
//! the `testcontainers` crate, for machines that have a Docker engine but no Postgres binaries.
//!
//! This path cannot run on machines without a Docker engine (the CI machine has none), so it is
//! only compiled there. Tests that own their cluster (a crash restart, a custom `pg_hba.conf`,
//! a second server with `wal_level=replica`) still start it from the local binaries: see
//! [`OwnCluster`].

use std::ops::{Deref, DerefMut};
use std::process::{Command, Stdio};
use std::time::Duration;

use rowcast::apps::cluster::ClusterError;
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::bollard::query_parameters::RemoveContainerOptionsBuilder;
use testcontainers_modules::testcontainers::core::client::docker_client_instance;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

/// The `postgres` image tag.
const TAG: &str = "16";

/// The server settings of `rowcast::apps::cluster`, less the ones about where it listens (the
/// image listens on every address of the container, on 5432).
const SETTINGS: [(&str, &str); 8] = [
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

/// Names the container the reaper removes, and the process it outlives: `PID CONTAINER_ID`.
const REAPER_ENV: &str = "ROWCAST_TEST_CONTAINER_REAPER";

/// A running Postgres container, superuser `postgres` with trust authentication; dropping it
/// removes the container.
pub struct Container {
    /// The host its port is published on.
    pub host: String,
    /// The host port that leads to the container's 5432.
    pub port: u16,
    container: Option<ContainerAsync<Postgres>>,
    /// The runtime the container's Docker client was made on, to remove it with.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Container {
    /// Starts the container and waits until it accepts connections. It is removed when dropped,
    /// and in any case once this process has ended.
    ///
    /// Blocks, and may be called from async code: the work runs on a thread of its own.
    pub fn start() -> Container {
        std::thread::spawn(Self::start_here)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    fn start_here() -> Container {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the Docker client");
        let mut command = vec!["postgres".to_owned()];
        for (name, value) in SETTINGS {
            command.push("-c".to_owned());
            command.push(format!("{name}={value}"));
        }
        let request = Postgres::default()
            .with_host_auth()
            .with_tag(TAG)
            // Like the local cluster's initdb.
            .with_env_var("POSTGRES_INITDB_ARGS", "-E UTF8 --locale=C")
            .with_cmd(command)
            .with_startup_timeout(Duration::from_secs(120));
        let container = runtime.block_on(request.start()).unwrap_or_else(|err| {
            panic!("starting the postgres:{TAG} container (this needs a Docker engine): {err}")
        });
        spawn_reaper(container.id());
        let (host, port) = runtime.block_on(async {
            let host = container.get_host().await.expect("the container's host").to_string();
            let port = container.get_host_port_ipv4(5432).await.expect("the container's port");
            (host, port)
        });
        // The port is the IPv4 one; "localhost" could resolve to ::1 first.
        let host = if host == "localhost" { "127.0.0.1".to_owned() } else { host };
        Container { host, port, container: Some(container), runtime: Some(runtime) }
    }

    /// The URL of `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{}:{}/{database}", self.host, self.port)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let (Some(container), Some(runtime)) = (self.container.take(), self.runtime.take()) else {
            return;
        };
        // Inside a test's runtime neither blocking on another runtime nor dropping one is
        // allowed: both happen on a thread of their own.
        let removal = std::thread::spawn(move || {
            if let Err(err) = runtime.block_on(container.rm()) {
                eprintln!("removing the Postgres container: {err}");
            }
        });
        let _ = removal.join();
    }
}

/// Starts a process that removes the container once this one has ended.
///
/// The shared container lives in a `static`, which is never dropped, and the process may also
/// end by a crash or `kill -9`. The reaper is this test binary again, running only
/// [`reap_container_after_exit`]; it has its own process group, so a Ctrl-C in the terminal
/// does not end it before it has done its work.
fn spawn_reaper(container_id: &str) {
    let spawned = std::env::current_exe().and_then(|test_binary| {
        use std::os::unix::process::CommandExt;
        Command::new(test_binary)
            .args(["--exact", "support::docker::reap_container_after_exit", "--test-threads=1"])
            .env(REAPER_ENV, format!("{} {container_id}", std::process::id()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    });
    if let Err(err) = spawned {
        eprintln!("no reaper for container {container_id}, remove it by hand: {err}");
    }
}

/// Not a test: the reaper [`spawn_reaper`] starts. Without its environment variable (any
/// ordinary run) it does nothing.
#[test]
fn reap_container_after_exit() {
    let Ok(job) = std::env::var(REAPER_ENV) else { return };
    let (pid, container_id) = job.split_once(' ').expect("PID CONTAINER_ID");
    while Command::new("kill")
        .args(["-0", pid])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
    {
        std::thread::sleep(Duration::from_secs(1));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the Docker client");
    runtime.block_on(async {
        let docker = docker_client_instance().await.expect("a Docker client");
        // Already gone when the container was dropped: nothing to report.
        let _ = docker
            .remove_container(
                container_id,
                Some(RemoveContainerOptionsBuilder::new().force(true).v(true).build()),
            )
            .await;
    });
}

/// A cluster of a test's own, from the local binaries as without the feature: it stands in for
/// `rowcast::apps::cluster::Cluster` so that on a machine without those binaries such a test
/// fails saying why, instead of with a bare `NoBinaries`.
///
/// The tests that use it need a server of their own that a container does not give them: one
/// they crash and restart on the same port, one with their own `pg_hba.conf`, one with
/// `wal_level=replica`.
pub struct OwnCluster(rowcast::apps::cluster::Cluster);

impl OwnCluster {
    /// See `rowcast::apps::cluster::Cluster::start`.
    pub fn start(extra: &[(&str, &str)]) -> Result<OwnCluster, ClusterError> {
        Self::start_with_hba(extra, None)
    }

    /// See `rowcast::apps::cluster::Cluster::start_with_hba`.
    pub fn start_with_hba(
        extra: &[(&str, &str)],
        hba: Option<&str>,
    ) -> Result<OwnCluster, ClusterError> {
        match rowcast::apps::cluster::Cluster::start_with_hba(extra, hba) {
            Err(err @ (ClusterError::NoBinaries | ClusterError::BadBinaries(_))) => panic!(
                "this test starts a Postgres server of its own (to crash and restart it, with its \
                 own pg_hba.conf or other settings), which the shared container of \
                 `--features testcontainers` cannot stand in for; it needs the machine's \
                 Postgres binaries: {err}"
            ),
            started => started.map(OwnCluster),
        }
    }
}

impl Deref for OwnCluster {
    type Target = rowcast::apps::cluster::Cluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for OwnCluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
