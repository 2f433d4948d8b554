//! TLS to Postgres as libpq's `sslmode` and `sslrootcert` ask for it, for both kinds of
//! connection rowcast makes: tokio-postgres's SQL connections ([`Connector`]) and the
//! replication client, which sends SSLRequest itself and then calls [`Tls::handshake`].
//!
//! ```text
//! sslmode       encrypted                 chain checked            host name checked
//! disable       no                        -                        -
//! prefer        if the server agrees      only with sslrootcert    no
//! require       yes                       only with sslrootcert    no
//! verify-ca     yes                       yes                      no
//! verify-full   yes                       yes                      yes
//! ```
//!
//! `prefer` falls back to plain only when the server answers SSLRequest with 'N'. The chain is
//! checked against `sslrootcert`'s PEM file, or the system's roots (`rustls-native-certs`, which
//! also reads `SSL_CERT_FILE`/`SSL_CERT_DIR`) for `sslrootcert=system` or a verifying mode
//! without `sslrootcert`. Roots are read at each connection, as libpq does, so a rotated CA file
//! is picked up without a restart. Unix-domain sockets never use TLS (libpq ignores `sslmode`
//! there). Failures to trust the server are definite errors: no retry makes a certificate valid.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`, less `allow` (plain first, TLS only if refused), which rowcast does not
/// offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sslrootcert`: a PEM file of trusted roots, or `system`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    System,
    File(PathBuf),
}

/// The TLS policy of one connection target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndHost,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslrootcert {path}: {reason}", path = path.display())]
    RootFile { path: PathBuf, reason: String },
    #[error("no system root certificates to verify the server with{detail}")]
    NoSystemRoots { detail: String },
    #[error("building the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("{host:?} cannot be checked against a certificate: {reason}")]
    ServerName { host: String, reason: String },
    #[error("{host} does not accept TLS connections, and sslmode={mode} requires TLS")]
    Refused { host: String, mode: SslMode },
    #[error("the server certificate of {host} is not trusted by {roots}: {reason}")]
    Untrusted { host: String, roots: String, reason: CertificateError },
    #[error(
        "the server certificate is not valid for the host name {host} \
         (sslmode=verify-full checks it): {reason}"
    )]
    WrongHost { host: String, reason: CertificateError },
    #[error("the TLS handshake with {host} failed: {source}")]
    Handshake { host: String, source: io::Error },
}

impl TlsError {
    /// Only a handshake cut short may go better next time; the rest is configuration.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Handshake { .. })
    }
}

impl Tls {
    fn check(&self) -> Check {
        match self.mode {
            SslMode::VerifyFull => Check::ChainAndHost,
            SslMode::VerifyCa => Check::Chain,
            // libpq checks the chain whenever it has a root file, for backwards compatibility:
            // `require` with `sslrootcert` behaves as `verify-ca`.
            SslMode::Prefer | SslMode::Require if self.root_cert.is_some() => Check::Chain,
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Check::Nothing,
        }
    }

    /// Whether the connection must be encrypted (a server that refuses SSL is an error).
    pub fn required(&self) -> bool {
        !matches!(self.mode, SslMode::Disable | SslMode::Prefer)
    }

    /// What tokio-postgres is told: it negotiates, the certificate checks are ours.
    pub(crate) fn negotiation(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Negotiation;
        match self.mode {
            SslMode::Disable => Negotiation::Disable,
            SslMode::Prefer => Negotiation::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Negotiation::Require,
        }
    }

    /// The rustls client configuration, reading the roots when the certificate is checked.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = self.check();
        let roots = match check {
            Check::Nothing => None,
            Check::Chain | Check::ChainAndHost => Some(Arc::new(self.roots()?)),
        };
        let verifier = Verifier {
            roots,
            check_host: check == Check::ChainAndHost,
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // What libpq 17 sends; servers before 17 ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(config)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(RootCert::File(path)) => {
                let unreadable = |reason: String| TlsError::RootFile { path: path.clone(), reason };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|err| unreadable(err.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| unreadable(err.to_string()))?;
                roots.add_parsable_certificates(certs);
                if roots.is_empty() {
                    return Err(unreadable("no usable PEM certificate in the file".into()));
                }
            }
            Some(RootCert::System) | None => {
                let loaded = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(loaded.certs);
                if roots.is_empty() {
                    let detail =
                        loaded.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
                    return Err(TlsError::NoSystemRoots { detail });
                }
            }
        }
        Ok(roots)
    }

    fn roots_name(&self) -> String {
        match &self.root_cert {
            Some(RootCert::File(path)) => format!("sslrootcert {}", path.display()),
            Some(RootCert::System) | None => "the system's root certificates".into(),
        }
    }

    /// The TLS handshake over a stream on which the server has agreed to TLS ('S').
    pub async fn handshake<S>(
        &self,
        stream: S,
        host: &str,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(host)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(self.client_config()?));
        connector.connect(name, stream).await.map_err(|err| self.explain(err, host))
    }

    /// Says which check failed, from the error rustls reports inside tokio-rustls' `io::Error`.
    fn explain(&self, err: io::Error, host: &str) -> TlsError {
        let host = host.to_owned();
        let rejected = err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match rejected {
            Some(rustls::Error::InvalidCertificate(
                reason @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            )) => TlsError::WrongHost { host, reason: reason.clone() },
            Some(rustls::Error::InvalidCertificate(reason)) => {
                TlsError::Untrusted { host, roots: self.roots_name(), reason: reason.clone() }
            }
            _ => TlsError::Handshake { host, source: err },
        }
    }

    /// The connector tokio-postgres calls for SQL connections.
    pub(crate) fn connector(&self) -> Connector {
        Connector { tls: self.clone() }
    }
}

fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned())
        .map_err(|err| TlsError::ServerName { host: host.to_owned(), reason: err.to_string() })
}

/// libpq's checks on rustls' parts: the chain against the roots (unless nothing is checked),
/// then the host name (verify-full only). Handshake signatures are always verified: they prove
/// the server holds the key of the certificate it showed.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_host: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else { return Ok(ServerCertVerified::assertion()) };
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_host {
            verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

type Socket = tokio_postgres::Socket;
type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
type Inner = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;

/// tokio-postgres-rustls (which also gives SCRAM its channel binding), with the configuration
/// built per connection and handshake failures explained as [`TlsError`]s.
pub(crate) struct Connector {
    tls: Tls,
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = Stream;
    type TlsConnect = Handshake;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Handshake, TlsError> {
        // Called for every connection, TLS or not; reads no roots unless a check needs them.
        let mut rustls = MakeRustlsConnect::new(self.tls.client_config()?);
        let inner = match MakeTlsConnect::<Socket>::make_tls_connect(&mut rustls, host) {
            Ok(inner) => inner,
            Err(never) => match never {},
        };
        Ok(Handshake { inner, tls: self.tls.clone(), host: host.to_owned() })
    }
}

pub(crate) struct Handshake {
    inner: Inner,
    tls: Tls,
    host: String,
}

impl TlsConnect<Socket> for Handshake {
    type Stream = Stream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, TlsError>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            // A host name rustls cannot check is a definite error, not a failed handshake.
            server_name(&self.host)?;
            self.inner.connect(stream).await.map_err(|err| self.tls.explain(err, &self.host))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(SslMode::parse(mode.as_str()), Some(mode));
        }
        for junk in ["allow", "", "REQUIRE", "verify_full"] {
            assert_eq!(SslMode::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn checks_as_libpq() {
        let file = Some(RootCert::File("ca.pem".into()));
        let cases = [
            (SslMode::Prefer, None, Check::Nothing),
            (SslMode::Require, None, Check::Nothing),
            (SslMode::Require, file.clone(), Check::Chain),
            (SslMode::Prefer, file.clone(), Check::Chain),
            (SslMode::VerifyCa, None, Check::Chain),
            (SslMode::VerifyCa, file.clone(), Check::Chain),
            (SslMode::VerifyFull, None, Check::ChainAndHost),
            (SslMode::VerifyFull, Some(RootCert::System), Check::ChainAndHost),
        ];
        for (mode, root_cert, check) in cases {
            let tls = Tls { mode, root_cert: root_cert.clone() };
            assert_eq!(tls.check(), check, "{mode} {root_cert:?}");
        }
        assert!(!Tls::default().required());
        assert!(Tls { mode: SslMode::Require, root_cert: None }.required());
    }

    #[test]
    fn unreadable_roots_are_reported_before_connecting() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let tls = Tls { mode: SslMode::VerifyFull, root_cert: Some(RootCert::File(missing)) };
        let err = tls.client_config().expect_err("missing file");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        assert!(!err.is_retryable());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let tls = Tls { mode: SslMode::VerifyCa, root_cert: Some(RootCert::File(empty)) };
        let err = tls.client_config().expect_err("no certificate");
        assert!(err.to_string().contains("no usable PEM certificate"), "{err}");
        // Nothing to read when nothing is checked.
        let tls = Tls { mode: SslMode::Require, root_cert: None };
        assert!(tls.client_config().is_ok());
    }
}
