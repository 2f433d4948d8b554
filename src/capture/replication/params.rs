//! Where and as whom a replication connection goes, read from a `tokio_postgres::Config`.

use std::path::PathBuf;
use std::time::Duration;

use super::ReplicationError;

/// Where and as whom to connect; taken from the same URL `tokio-postgres` parses.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub targets: Vec<Target>,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub database: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

impl ConnectParams {
    pub fn from_config(
        config: &tokio_postgres::Config,
        max_message_bytes: usize,
    ) -> Result<Self, ReplicationError> {
        use tokio_postgres::config::{Host, SslMode};
        if config.get_ssl_mode() == SslMode::Require {
            return Err(ReplicationError::Unsupported(
                "sslmode=require: TLS is not supported yet; use sslmode=disable or prefer".into(),
            ));
        }
        let ports = config.get_ports();
        let mut targets = Vec::new();
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            targets.push(match host {
                Host::Tcp(host) => Target::Tcp { host: host.clone(), port },
                Host::Unix(dir) => Target::Unix { path: dir.join(format!(".s.PGSQL.{port}")) },
            });
        }
        if targets.is_empty() {
            let port = ports.first().copied().unwrap_or(5432);
            targets.push(Target::Unix {
                path: PathBuf::from(format!("/var/run/postgresql/.s.PGSQL.{port}")),
            });
        }
        let user = match config.get_user() {
            Some(user) => user.to_owned(),
            None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        };
        Ok(Self {
            targets,
            database: config.get_dbname().unwrap_or(&user).to_owned(),
            password: config.get_password().map(<[u8]>::to_vec),
            user,
            application_name: config.get_application_name().unwrap_or("rowcast").to_owned(),
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            max_message_bytes,
        })
    }
}
