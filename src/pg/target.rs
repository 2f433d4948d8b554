//! Where a connection goes: the `tokio_postgres::Config` and the TLS policy, read from one
//! connection string.
//!
//! tokio-postgres knows `sslmode` only as disable/prefer/require and refuses `verify-ca`,
//! `verify-full` and `sslrootcert`, so rowcast takes those two parameters out of the URL (or
//! `key=value` string) itself and hands the rest to tokio-postgres unchanged.

use std::path::PathBuf;
use std::str::FromStr;

use super::tls::{RootCert, SslMode, Tls};

/// A Postgres server and database to connect to, and how to secure the connection. `tls`
/// decides; the `sslmode` of `config` is ignored when connecting.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Config(tokio_postgres::Error),
    #[error("sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error(
        "sslmode={0} may not be used with sslrootcert=system (use verify-full, as libpq requires)"
    )]
    WeakWithSystemRoots(SslMode),
}

impl Target {
    /// A target with the TLS policy `config`'s own `sslmode` states (no certificate checks).
    pub fn new(config: tokio_postgres::Config) -> Self {
        use tokio_postgres::config::SslMode as Negotiation;
        let mode = match config.get_ssl_mode() {
            Negotiation::Disable => SslMode::Disable,
            Negotiation::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        Self { config, tls: Tls { mode, root_cert: None } }
    }

    /// The config to connect with: its `sslmode` is what `tls` says, and off when every host
    /// is a Unix-domain socket, where Postgres has no TLS (libpq ignores `sslmode` there).
    pub(crate) fn sql_config(&self) -> tokio_postgres::Config {
        use tokio_postgres::config::{Host, SslMode as Negotiation};
        let mut config = self.config.clone();
        let hosts = config.get_hosts();
        let local = !hosts.is_empty() && !hosts.iter().any(|host| matches!(host, Host::Tcp(_)));
        let mode = if local { Negotiation::Disable } else { self.tls.negotiation() };
        config.ssl_mode(mode);
        // A connection whose path died says nothing: TCP keepalives end it within a minute,
        // not the operating system's default two hours. A URL that sets its own keeps it.
        if config.get_keepalives_idle() == TWO_HOURS {
            config.keepalives_idle(KEEPALIVE_IDLE);
            config.keepalives_interval(KEEPALIVE_INTERVAL);
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        config
    }
}

/// tokio-postgres's default keepalive idle time, which means "not set".
const TWO_HOURS: std::time::Duration = std::time::Duration::from_secs(2 * 3600);
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

impl FromStr for Target {
    type Err = TargetError;

    /// Reads a `postgres://` URL or a `key=value` string as libpq does, `sslmode` and
    /// `sslrootcert` included. Reads no file: the roots are read when connecting.
    fn from_str(text: &str) -> Result<Self, TargetError> {
        let (rest, found) = if text.starts_with("postgres://") || text.starts_with("postgresql://")
        {
            split_url(text)
        } else {
            split_keywords(text)
        };
        let mut config: tokio_postgres::Config = rest.parse().map_err(TargetError::Config)?;
        let root_cert = found.root_cert.filter(|value| !value.is_empty()).map(|value| {
            if value == "system" { RootCert::System } else { RootCert::File(PathBuf::from(value)) }
        });
        let mode = match found.mode {
            Some(text) => SslMode::parse(&text).ok_or(TargetError::SslMode(text))?,
            // libpq: system roots make verify-full the default, and the only mode allowed.
            None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
            return Err(TargetError::WeakWithSystemRoots(mode));
        }
        let tls = Tls { mode, root_cert };
        config.ssl_mode(tls.negotiation());
        Ok(Self { config, tls })
    }
}

/// The TLS parameters found in a connection string; the last of each wins, as in libpq.
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    mode: Option<String>,
    root_cert: Option<String>,
}

impl Found {
    /// Takes `key=value` if it is a TLS parameter.
    fn take(&mut self, key: &str, value: String) -> bool {
        match key {
            "sslmode" => self.mode = Some(value),
            "sslrootcert" => self.root_cert = Some(value),
            _ => return false,
        }
        true
    }
}

/// `postgres://...?a=1&sslmode=verify-full&b=2` -> (`postgres://...?a=1&b=2`, found).
fn split_url(url: &str) -> (String, Found) {
    let mut found = Found::default();
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), found) };
    let decode =
        |text: &str| percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned();
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            !found.take(&decode(key), decode(value))
        })
        .collect();
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    (rest, found)
}

/// `host=h sslmode='verify-full' dbname=d` -> (`host=h  dbname=d`, found), with libpq's quoting
/// (single quotes, backslash escapes). Anything malformed is left for tokio-postgres to report.
fn split_keywords(text: &str) -> (String, Found) {
    let mut found = Found::default();
    let mut rest = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    let skip_spaces = |at: usize| {
        text[at..].find(|c: char| !c.is_ascii_whitespace()).map_or(text.len(), |i| at + i)
    };
    loop {
        let start = skip_spaces(at);
        if start == text.len() {
            break;
        }
        let key_end = text[start..]
            .find(|c: char| c == '=' || c.is_ascii_whitespace())
            .map_or(text.len(), |i| start + i);
        let equals = skip_spaces(key_end);
        if !text[equals..].starts_with('=') {
            break;
        }
        let Some((value, end)) = keyword_value(text, skip_spaces(equals + 1)) else { break };
        if found.take(&text[start..key_end], value) {
            rest.push_str(&text[copied..start]);
            copied = end;
        }
        at = end;
    }
    rest.push_str(&text[copied..]);
    (rest, found)
}

/// The value starting at `at` and where it ends; `None` for an unterminated quote.
fn keyword_value(text: &str, at: usize) -> Option<(String, usize)> {
    let quoted = text[at..].starts_with('\'');
    let begin = if quoted { at + 1 } else { at };
    let mut value = String::new();
    let mut chars = text[begin..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, escaped)) => value.push(escaped),
                None => return (!quoted).then_some((value, text.len())),
            },
            '\'' if quoted => return Some((value, begin + i + 1)),
            c if !quoted && c.is_ascii_whitespace() => return Some((value, begin + i)),
            c => value.push(c),
        }
    }
    (!quoted).then_some((value, text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Target {
        text.parse().unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    fn file(path: &str) -> Option<RootCert> {
        Some(RootCert::File(path.into()))
    }

    #[test]
    fn urls() {
        let t = target(
            "postgres://u:p@db.example.com:6543/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        assert_eq!(t.tls, Tls { mode: SslMode::VerifyFull, root_cert: file("/etc/ca.pem") });
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.config.get_dbname(), Some("app"));
        assert_eq!(t.config.get_ports(), [6543]);
        assert_eq!(t.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);

        let t = target("postgresql://h/db?sslmode=verify-ca");
        assert_eq!(t.tls, Tls { mode: SslMode::VerifyCa, root_cert: None });
        let t = target("postgres://h/db?sslmode=disable");
        assert_eq!(t.tls.mode, SslMode::Disable);
        assert_eq!(t.config.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let t = target("postgres://h/db");
        assert_eq!(t.tls, Tls::default());
        // The last value wins; other parameters pass through untouched.
        let t = target("postgres://h/db?sslmode=disable&connect_timeout=3&sslmode=require");
        assert_eq!(t.tls.mode, SslMode::Require);
        assert_eq!(t.config.get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));
    }

    #[test]
    fn keyword_strings() {
        let t = target("host=localhost sslmode=verify-full sslrootcert='/tmp/my ca.pem' dbname=d");
        assert_eq!(t.tls, Tls { mode: SslMode::VerifyFull, root_cert: file("/tmp/my ca.pem") });
        assert_eq!(t.config.get_dbname(), Some("d"));
        let t = target("sslrootcert = /a\\ b.pem  sslmode = require  user=u");
        assert_eq!(t.tls, Tls { mode: SslMode::Require, root_cert: file("/a b.pem") });
        assert_eq!(t.config.get_user(), Some("u"));
        let t = target("host=h password='a\\'b sslmode=require'");
        assert_eq!(t.tls.mode, SslMode::Prefer, "inside a quoted value");
        assert_eq!(t.config.get_password(), Some(&b"a'b sslmode=require"[..]));
    }

    #[test]
    fn split_keeps_the_rest_verbatim() {
        let (rest, found) = split_keywords("host=h  sslmode='verify-ca' user='x y'");
        assert_eq!(rest, "host=h   user='x y'");
        assert_eq!(found.mode.as_deref(), Some("verify-ca"));
        let (rest, found) = split_url("postgres://h/db?sslrootcert=system");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(found.root_cert.as_deref(), Some("system"));
        // Malformed input is left for tokio-postgres, which says what is wrong.
        assert_eq!(split_keywords("host").0, "host");
        assert_eq!(split_keywords("sslmode='require").0, "sslmode='require");
    }

    #[test]
    fn system_roots_need_verify_full() {
        let t = target("postgres://h/db?sslrootcert=system");
        assert_eq!(t.tls, Tls { mode: SslMode::VerifyFull, root_cert: Some(RootCert::System) });
        for mode in ["require", "verify-ca", "prefer", "disable"] {
            let err = format!("postgres://h/db?sslrootcert=system&sslmode={mode}")
                .parse::<Target>()
                .expect_err(mode);
            assert!(matches!(err, TargetError::WeakWithSystemRoots(_)), "{mode}: {err}");
        }
    }

    #[test]
    fn refusals() {
        for text in ["postgres://h/db?sslmode=allow", "host=h sslmode=verify_full"] {
            let err = text.parse::<Target>().expect_err(text);
            assert!(matches!(err, TargetError::SslMode(_)), "{text}: {err}");
        }
        assert!(matches!(
            "postgres://h/db?nonsense=1".parse::<Target>(),
            Err(TargetError::Config(_))
        ));
        // An empty sslrootcert is no sslrootcert.
        assert_eq!(target("postgres://h/db?sslmode=require&sslrootcert=").tls.root_cert, None);
    }

    #[test]
    fn configs_keep_their_sslmode_and_sockets_get_none() {
        let mut config = tokio_postgres::Config::new();
        config.host("h").ssl_mode(tokio_postgres::config::SslMode::Require);
        assert_eq!(Target::new(config).tls.mode, SslMode::Require);
        let t = target("host=/var/run/postgresql sslmode=require");
        assert_eq!(t.sql_config().get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let t = target("host=localhost sslmode=verify-ca");
        assert_eq!(t.sql_config().get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }
}
