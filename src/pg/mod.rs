//! Postgres plumbing every stage shares: how a connection is opened, how names are quoted,
//! what an LSN is, and which failures are worth retrying.
//!
//! ```text
//! mod.rs    connect (the one place that chooses the transport), LISTEN connections
//! target.rs where a connection goes: tokio-postgres's config and the TLS policy, from one URL
//! tls.rs    libpq's sslmode and sslrootcert on rustls, for SQL and replication connections
//! error.rs  the one classifier: transient (reconnect later) or definite (stop and say why)
//! lsn.rs    the WAL position type, parsed and printed as Postgres does (`0/16B3748`)
//! quote.rs  identifiers and literals for SQL built at run time
//! pool.rs   a few shared reader connections, replaced when they break
//! ```
//!
//! Nothing here knows about events: capture, the log, setup and the HTTP side all sit above.

mod error;
mod lsn;
mod pool;
mod quote;
mod target;
mod tls;

pub use error::{Transience, is_transient, sqlstate_transience, transience};
pub use lsn::{Lsn, format_lsn, parse_lsn};
pub use pool::Pool;

/// How long opening a connection may take when the URL does not set `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub use quote::{quote_ident, quote_literal};
pub use target::{Target, TargetError};
pub use tls::{RootCert, SslMode, Tls, TlsError};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

/// `host:port/database (role)`, for messages that must say which connection failed. Never
/// the password.
pub fn describe(target: &Target, role: &str) -> String {
    use tokio_postgres::config::Host;
    let config = &target.config;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{database} ({role})")
}

/// The configuration of a `role` connection: named `rowcast <role>` in `pg_stat_activity`
/// unless the URL names it (`application_name=...`).
fn named(target: &Target, role: &str) -> tokio_postgres::Config {
    let mut config = target.sql_config();
    if config.get_application_name().is_none() {
        config.application_name(format!("rowcast {role}"));
    }
    config
}

/// Connects with a background connection task; errors of that task end the client. `role`
/// names the connection in logs (`log writer`, `catalog`, `stats`, ...) and, unless the URL
/// names it, in `pg_stat_activity` (`rowcast log writer`). TLS is as the target's `sslmode`
/// says; a certificate that fails its checks is a definite error.
pub async fn connect(target: &Target, role: &'static str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = named(target, role).connect(target.tls.connector()).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(connection = role, error = %err, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Connects a client whose notifications arrive on the returned channel, one wake-up per
/// notification (a full channel already holds one: nothing is lost by dropping another). The
/// channel closes when the connection ends; dropping the client ends the connection.
pub async fn connect_notified(
    target: &Target,
    role: &'static str,
) -> Result<(Client, mpsc::Receiver<()>), tokio_postgres::Error> {
    let (client, mut connection) = named(target, role).connect(target.tls.connector()).await?;
    let (wake_tx, wake_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = wake_tx.try_send(());
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(connection = role, error = %err, "postgres connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, wake_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_named_after_their_role_unless_the_url_names_them() {
        let target: Target = "postgres://u@h/db".parse().expect("url");
        assert_eq!(named(&target, "log writer").get_application_name(), Some("rowcast log writer"));
        let target: Target = "postgres://u@h/db?application_name=billing".parse().expect("url");
        assert_eq!(named(&target, "log writer").get_application_name(), Some("billing"));
    }
}
