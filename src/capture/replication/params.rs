//! Where and as whom a replication connection goes, read from the same [`Target`] as the SQL
//! connections, TLS policy included.

use std::path::PathBuf;
use std::time::Duration;

use crate::pg::{Target, Tls};

/// Where and as whom to connect; taken from the same URL `tokio-postgres` parses.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Tried in turn, as libpq tries the hosts of a multi-host URL.
    pub addresses: Vec<Address>,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub database: String,
    pub application_name: String,
    /// Bounds the TCP connect and the TLS handshake.
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    pub tls: Tls,
}

#[derive(Debug, Clone)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

impl ConnectParams {
    pub fn from_target(target: &Target, max_message_bytes: usize) -> Self {
        use tokio_postgres::config::Host;
        let config = &target.config;
        let ports = config.get_ports();
        let mut addresses = Vec::new();
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            addresses.push(match host {
                Host::Tcp(host) => Address::Tcp { host: host.clone(), port },
                Host::Unix(dir) => Address::Unix { path: dir.join(format!(".s.PGSQL.{port}")) },
            });
        }
        if addresses.is_empty() {
            let port = ports.first().copied().unwrap_or(5432);
            addresses.push(Address::Unix {
                path: PathBuf::from(format!("/var/run/postgresql/.s.PGSQL.{port}")),
            });
        }
        let user = match config.get_user() {
            Some(user) => user.to_owned(),
            None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        };
        Self {
            addresses,
            database: config.get_dbname().unwrap_or(&user).to_owned(),
            password: config.get_password().map(<[u8]>::to_vec),
            user,
            application_name: config.get_application_name().unwrap_or("rowcast").to_owned(),
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(crate::pg::DEFAULT_CONNECT_TIMEOUT),
            max_message_bytes,
            tls: target.tls.clone(),
        }
    }
}
