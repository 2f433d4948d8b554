//! TLS on the Postgres-protocol endpoint (`--pg-tls-cert`, `--pg-tls-key`): a client that asks
//! for it (`sslmode=require` and up, or libpq 17's direct negotiation) gets it, so a token sent
//! as a password is not sent in the clear. rustls on the `ring` provider, as everywhere else.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server configuration from a PEM certificate chain and its PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let unreadable = |path: &Path, reason: String| TlsError::File { path: path.to_owned(), reason };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|err| unreadable(cert, err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| unreadable(cert, err.to_string()))?;
    if chain.is_empty() {
        return Err(unreadable(cert, "no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|err| unreadable(key, err.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // What libpq 17 asks for when it negotiates TLS directly.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}
