//! The one rule for Postgres failures: is trying again later worth it?
//!
//! Every error type of rowcast that wraps a Postgres failure answers `is_retryable` through
//! this module, so a dropped connection means the same thing during the mapping check, the slot
//! check, an append or a drain: reconnect with backoff. Only what a reconnect cannot change
//! (bad credentials, a missing table, a feature the server lacks, WAL already removed) is
//! definite, and definite errors stop the pipeline loudly instead of looping.
//!
//! The rule is an allow-list of SQLSTATE classes known to pass, so an unfamiliar code is
//! reported rather than retried forever while a slot holds WAL.

use super::TlsError;

/// Whether a failure may go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transience {
    /// The connection dropped, the server is restarting or busy: reconnect later.
    Transient,
    /// The same request will fail the same way: stop and say why.
    Definite,
}

/// How a `tokio_postgres` error should be treated. Errors without a SQLSTATE are I/O,
/// timeouts and closed connections: transient; except a server certificate that fails its
/// checks or TLS settings that cannot work, which no reconnect changes.
pub fn transience(err: &tokio_postgres::Error) -> Transience {
    if let Some(code) = err.code() {
        return sqlstate_transience(code.code());
    }
    let tls = std::error::Error::source(err).and_then(|cause| cause.downcast_ref::<TlsError>());
    match tls {
        Some(tls) if !tls.is_retryable() => Transience::Definite,
        _ => Transience::Transient,
    }
}

pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    transience(err) == Transience::Transient
}

/// The rule by SQLSTATE, for clients that read the code themselves (the replication client).
pub fn sqlstate_transience(code: &str) -> Transience {
    let transient = match code {
        // WAL the slot needs was removed: no reconnect brings it back.
        "58P01" => false,
        // The database was dropped under us.
        "57P04" => false,
        // A replication slot still held by a session that is going away; a lock not granted.
        "55006" | "55P03" => true,
        // A read-only transaction: connected to a standby, typically during a failover.
        "25006" => true,
        _ => matches!(
            code.get(..2),
            // connection exception, insufficient resources, operator intervention (shutdown,
            // restart, cancel), transaction rollback (serialization, deadlock), system I/O.
            Some("08" | "53" | "57" | "40" | "58")
        ),
    };
    if transient { Transience::Transient } else { Transience::Definite }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_by_class() {
        for code in
            ["08006", "08001", "53300", "57P01", "57P03", "57014", "40001", "55006", "58030"]
        {
            assert_eq!(sqlstate_transience(code), Transience::Transient, "{code}");
        }
        for code in
            ["28P01", "28000", "3D000", "42P01", "42703", "0A000", "55000", "58P01", "57P04"]
        {
            assert_eq!(sqlstate_transience(code), Transience::Definite, "{code}");
        }
        for junk in ["", "4", "XX000", "ünï"] {
            assert_eq!(sqlstate_transience(junk), Transience::Definite, "{junk}");
        }
    }
}
