//! Who may ask: tokens, origins and loopback hosts, checked the same way for every route and
//! every WebSocket handshake, and every refusal rendered one way.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::auth::Scope;

/// Every refusal of the HTTP side, WebSocket handshakes included, rendered one way:
/// `{"type":"error","code":...,"message":...}` with the matching status.
#[derive(Debug)]
pub enum AppError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    /// A body, an event or a batch over its limit (413).
    TooLarge(String),
    Unavailable(String),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            AppError::BadRequest(message) => (StatusCode::BAD_REQUEST, "bad_request", message),
            AppError::Unauthorized(message) => (StatusCode::UNAUTHORIZED, "unauthorized", message),
            AppError::Forbidden(message) => (StatusCode::FORBIDDEN, "forbidden", message),
            AppError::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message),
            AppError::TooLarge(message) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", message),
            AppError::Unavailable(message) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        };
        let body = json!({"type": "error", "code": code, "message": message}).to_string();
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The scope of a request's token (`Authorization: Bearer`, the bearer subprotocol or
/// `?token=`).
pub fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    query: &[(String, String)],
) -> Result<Scope, AppError> {
    let token = token_from(headers, query);
    state
        .settings
        .server
        .auth
        .verify(token.as_deref())
        .map_err(|err| AppError::Unauthorized(err.to_string()))
}

/// The scope of the request's token, as an extractor: routes that need one take it as an
/// argument and a refusal becomes the 401 response.
pub struct Authorized(pub Scope);

impl axum::extract::FromRequestParts<Arc<AppState>> for Authorized {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let pairs = query_pairs(parts.uri.query());
        authorize(state, &parts.headers, &pairs).map(Authorized)
    }
}

pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect()
}

/// The token of a request: `Authorization: Bearer`, the `rowcast.bearer.<token>` subprotocol,
/// or `?token=`, in that order.
pub fn token_from(headers: &HeaderMap, query: &[(String, String)]) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().to_owned());
    let subprotocol = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(crate::auth::BEARER_PROTOCOL).map(str::to_owned))
    };
    let query = || query.iter().rev().find(|(k, _)| k == "token").map(|(_, v)| v.clone());
    bearer.or_else(subprotocol).or_else(query)
}

/// Without tokens (`--auth none`, loopback only) every request must also name a loopback
/// host: a web page whose domain was rebound to 127.0.0.1 sends its own name and is refused.
pub async fn loopback_host(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if state.settings.server.auth.is_required() || is_loopback_host(host) {
        return next.run(request).await;
    }
    AppError::Forbidden("without --auth jwt only loopback host names are served".into())
        .into_response()
}

/// `localhost:8080`, `127.0.0.1`, `[::1]:80`, `app.localhost`.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host }
        }),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Browsers always send `Origin`; other clients may not (and could forge it anyway). With an
/// allow-list, only listed origins pass; without one, only the server's own origin does, so
/// a random web page cannot read the stream of a server on the developer's machine.
pub fn origin_allowed(allowed: Option<&[String]>, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let origin = normalize_origin(origin.to_str().unwrap_or(""));
    match allowed {
        Some(allowed) => allowed.iter().any(|a| normalize_origin(a) == origin),
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
            !host.is_empty() && origin_host == host.to_ascii_lowercase()
        }
    }
}

/// `HTTPS://App.Example/` → `https://app.example`.
pub fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:80",
            "app.localhost:3000",
        ] {
            assert!(super::is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "[::2]:80",
        ] {
            assert!(!super::is_loopback_host(host), "{host}");
        }
    }
}
