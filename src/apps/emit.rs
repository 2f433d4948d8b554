//! `rowcast emit`: publishes one application event to a running server (`POST /api/events`)
//! and prints its id. One attempt: with `--key`, running it again is safe (the server answers
//! a repeated key with the original id).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::Request;
use hyper::http::{StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::model::Severity;

/// The whole exchange may take this long.
const DEADLINE: Duration = Duration::from_secs(30);
/// Most bytes of a reply read.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// Flags of `rowcast emit`; each also reads an environment variable.
#[derive(Clone, clap::Args)]
pub struct EmitArgs {
    /// The server's base URL (http:// or https://; https trusts the system's roots).
    #[arg(long, env = "ROWCAST_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token with the emit claim (`rowcast token --emit`); never printed or logged.
    #[arg(long, env = "ROWCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The event type, declared in the server's mapping (`deployment.log`).
    #[arg(long = "type", value_name = "ENTITY.ACTION")]
    pub event_type: String,
    /// The event's data: a JSON object.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// Organization id.
    #[arg(long = "org", env = "ROWCAST_EMIT_ORG", value_name = "ID")]
    pub organization_id: Option<String>,
    /// Domain id.
    #[arg(long = "domain", env = "ROWCAST_EMIT_DOMAIN", value_name = "ID")]
    pub domain_id: Option<String>,
    /// Severity [default: the type's declared one].
    #[arg(long)]
    pub severity: Option<Severity>,
    /// Idempotency key: the same key again gives the original id and appends nothing.
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("invalid --{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("https:// needs root certificates to trust, and the system has none")]
    NoRoots,
    #[error("setting up TLS")]
    Tls(#[source] rustls::Error),
    #[error("cannot reach the server")]
    Connect(#[source] std::io::Error),
    #[error("talking to the server")]
    Http(#[source] hyper::Error),
    #[error("the server did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("the server refused the event: HTTP {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the server's answer is not understood: {0}")]
    Reply(String),
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> EmitError {
    EmitError::Invalid { flag, reason: reason.into() }
}

/// The request body `args` stand for. Pure.
pub fn body(args: &EmitArgs) -> Result<Value, EmitError> {
    let data: Value = serde_json::from_str(&args.data)
        .map_err(|err| invalid("data", format!("not JSON: {err}")))?;
    if !data.is_object() {
        return Err(invalid("data", "must be a JSON object"));
    }
    if !crate::mapping::is_app_type(&args.event_type) {
        return Err(invalid("type", "must be <entity>.<action>, each part [a-z][a-z0-9_]*"));
    }
    let mut event = json!({"type": args.event_type, "data": data});
    let fields = [
        ("organization_id", args.organization_id.clone()),
        ("domain_id", args.domain_id.clone()),
        ("severity", args.severity.map(|s| s.as_str().to_owned())),
        ("key", args.key.clone()),
    ];
    for (field, value) in fields {
        if let Some(value) = value {
            event[field] = Value::String(value);
        }
    }
    Ok(event)
}

/// Posts the event; returns its id (the original's when the key was already used).
pub async fn run(args: &EmitArgs) -> Result<u64, EmitError> {
    let body = body(args)?.to_string();
    let base = args.url.trim().trim_end_matches('/');
    let uri: Uri =
        format!("{base}/api/events").parse().map_err(|_| invalid("url", "not a valid URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(invalid("url", "the scheme must be http:// or https://")),
    };
    let host = uri.host().ok_or_else(|| invalid("url", "no host"))?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
    let mut request = Request::post(uri.path())
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = &args.token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Body::from(body)).map_err(|err| invalid("url", err.to_string()))?;
    let exchange = async {
        let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(EmitError::Connect)?;
        if tls {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| invalid("url", "the host is not a valid TLS name"))?;
            let connector = tokio_rustls::TlsConnector::from(tls_config()?);
            let stream = connector.connect(name, tcp).await.map_err(EmitError::Connect)?;
            send(stream, request).await
        } else {
            send(tcp, request).await
        }
    };
    let (status, reply) = tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| EmitError::TimedOut(DEADLINE))??;
    let value: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
    if status != StatusCode::CREATED {
        let message = value["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&reply).chars().take(200).collect());
        return Err(EmitError::Refused { status, message });
    }
    value["events"][0]["id"].as_u64().ok_or_else(|| EmitError::Reply(value.to_string()))
}

async fn send<S>(stream: S, request: Request<Body>) -> Result<(StatusCode, Vec<u8>), EmitError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(EmitError::Http)?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(EmitError::Http)?;
    let status = response.status();
    let bytes = axum::body::to_bytes(Body::new(response.into_body()), MAX_REPLY_BYTES)
        .await
        .map_err(|err| EmitError::Reply(err.to_string()))?;
    Ok((status, bytes.to_vec()))
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, EmitError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        return Err(EmitError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(EmitError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(data: &str, event_type: &str) -> EmitArgs {
        EmitArgs {
            url: "http://127.0.0.1:1".into(),
            token: None,
            event_type: event_type.into(),
            data: data.into(),
            organization_id: Some("quant".into()),
            domain_id: None,
            severity: Some(Severity::Warning),
            key: Some("k".into()),
        }
    }

    #[test]
    fn the_body_is_what_the_flags_say() {
        let body = body(&args(r#"{"n":1}"#, "build.started")).expect("body");
        assert_eq!(
            body,
            json!({"type": "build.started", "data": {"n": 1}, "organization_id": "quant",
                   "severity": "warning", "key": "k"})
        );
        for (data, kind) in [("[1]", "a.b"), ("{", "a.b"), ("{}", "Build")] {
            assert!(super::body(&args(data, kind)).is_err(), "{data} {kind}");
        }
    }
}
