//! Authorization (SPEC §6): bearer tokens (JWT) and the scope they grant.
//!
//! A token's `orgs` claim (`["*"]` for all) and optional `domains` claim confine everything
//! its holder sees: a filter naming anything outside them is `forbidden`, and a filter that
//! leaves organizations or domains out is narrowed to the claimed ones. Events with a null
//! organization are visible only to `["*"]`. Tokens are never logged.

use std::net::SocketAddr;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::filter::Filter;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--auth none is only allowed on a loopback address; {0} is not one (use --auth jwt)")]
    NoneOnPublicAddress(SocketAddr),
    #[error("--auth jwt needs --jwt-secret or --jwt-public-key")]
    NoKey,
    #[error("give --jwt-secret or --jwt-public-key, not both")]
    BothKeys,
    #[error(
        "--jwt-secret must be at least {MIN_SECRET_BYTES} bytes; a short HS256 secret can be guessed"
    )]
    WeakSecret,
    #[error("--jwt-public-key: {0}")]
    BadKey(String),
}

/// Shortest HS256 secret accepted (RFC 7518 asks for at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// How connections and requests are authorized.
#[derive(Clone)]
pub enum Auth {
    /// Everyone sees everything (loopback only).
    None,
    Jwt(Box<Verifier>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str(match self {
            Auth::None => "Auth::None",
            Auth::Jwt(_) => "Auth::Jwt",
        })
    }
}

#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Debug, Clone, Deserialize)]
struct Claims {
    exp: u64,
    orgs: Vec<String>,
    #[serde(default)]
    domains: Option<Vec<String>>,
    /// May publish application events (SPEC §3a).
    #[serde(default)]
    emit: bool,
}

/// A token's scope and whether it may publish application events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: Scope,
    pub emit: bool,
}

impl Grant {
    /// Whether an event with this organization and domain may be published: `emit`, and
    /// both inside the scope (a null organization only with `["*"]`, a null domain only
    /// without a `domains` claim).
    pub fn may_publish(
        &self,
        organization: Option<&str>,
        domain: Option<&str>,
    ) -> Result<(), String> {
        if !self.emit {
            return Err("the token may not publish events (it lacks the emit claim)".into());
        }
        match (organization, &self.scope.organizations) {
            (_, None) => {}
            (Some(org), Some(_)) if self.scope.allows_organization(org) => {}
            (Some(org), Some(_)) => {
                return Err(format!("organization {org:?} is outside your token's scope"));
            }
            (None, Some(_)) => {
                return Err(
                    "an event without an organization needs a token for all organizations".into()
                );
            }
        }
        match (domain, &self.scope.domains) {
            (_, None) => Ok(()),
            (Some(domain), Some(_)) if self.scope.allows_domain(domain) => Ok(()),
            (Some(domain), Some(_)) => {
                Err(format!("domain {domain:?} is outside your token's scope"))
            }
            (None, Some(_)) => {
                Err("an event without a domain needs a token for all domains".into())
            }
        }
    }
}

/// What a token (or its absence, with `--auth none`) grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every organization, and events without one.
    pub organizations: Option<Vec<String>>,
    /// `None`: every domain of those organizations.
    pub domains: Option<Vec<String>>,
    /// Seconds since the epoch; `None` never expires.
    pub expires_at: Option<u64>,
}

/// The furthest a token's expiry is waited for; a token may claim an `exp` centuries away.
const LONGEST_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// Seconds since the epoch, now.
fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl Scope {
    pub fn everything() -> Self {
        Self { organizations: None, domains: None, expires_at: None }
    }

    /// Whether the token has expired by now.
    pub fn has_expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= now_seconds())
    }

    /// Returns once the token has expired; never when it does not expire. A session races it
    /// against its work (the only timer here: everything else in this file is pure).
    pub async fn expired(&self) {
        match self.expires_at {
            Some(at) => {
                let left = std::time::Duration::from_secs(at.saturating_sub(now_seconds()));
                tokio::time::sleep(left.min(LONGEST_EXPIRY)).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Confines `filter` to this scope: names outside it are refused; missing ones become the
    /// claimed ones.
    pub fn confine(&self, filter: Filter) -> Result<Filter, String> {
        let organizations = confine(&self.organizations, filter.organizations(), "organization")?;
        let domains = confine(&self.domains, filter.domains(), "domain")?;
        Ok(filter.with_scope(organizations, domains))
    }

    /// Whether two scopes grant the same organizations and domains, in any order.
    pub fn same_grant(&self, other: &Scope) -> bool {
        fn set(list: &Option<Vec<String>>) -> Option<std::collections::BTreeSet<&str>> {
            list.as_ref().map(|l| l.iter().map(String::as_str).collect())
        }
        set(&self.organizations) == set(&other.organizations)
            && set(&self.domains) == set(&other.domains)
    }

    pub fn allows_organization(&self, organization: &str) -> bool {
        self.organizations.as_ref().is_none_or(|orgs| orgs.iter().any(|o| o == organization))
    }

    pub fn allows_domain(&self, domain: &str) -> bool {
        self.domains.as_ref().is_none_or(|domains| domains.iter().any(|d| d == domain))
    }
}

fn confine(
    granted: &Option<Vec<String>>,
    asked: Option<&[String]>,
    what: &str,
) -> Result<Option<Vec<String>>, String> {
    match (granted, asked) {
        (None, asked) => Ok(asked.map(<[String]>::to_vec)),
        (Some(granted), None) => Ok(Some(granted.clone())),
        (Some(granted), Some(asked)) => match asked.iter().find(|a| !granted.contains(a)) {
            Some(outside) => Err(format!("{what} {outside:?} is outside your token's scope")),
            None => Ok(Some(asked.to_vec())),
        },
    }
}

impl Auth {
    /// Builds the verifier from the flags; `--auth none` only on loopback.
    pub fn new(
        mode: &str,
        secret: Option<&str>,
        public_key_pem: Option<&[u8]>,
        listen: SocketAddr,
    ) -> Result<Self, ConfigError> {
        if mode == "none" {
            if !listen.ip().is_loopback() {
                return Err(ConfigError::NoneOnPublicAddress(listen));
            }
            return Ok(Auth::None);
        }
        let (key, algorithm) = match (secret, public_key_pem) {
            (Some(_), Some(_)) => return Err(ConfigError::BothKeys),
            (Some(secret), None) if secret.len() < MIN_SECRET_BYTES => {
                return Err(ConfigError::WeakSecret);
            }
            (Some(secret), None) => (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256),
            (None, Some(pem)) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(pem) {
                    Ok(key) => (key, Algorithm::ES256),
                    Err(err) => {
                        return Err(ConfigError::BadKey(format!(
                            "not an RSA or EC public key in PEM form ({err})"
                        )));
                    }
                },
            },
            (None, None) => return Err(ConfigError::NoKey),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Auth::Jwt(Box::new(Verifier { key, validation })))
    }

    /// The scope `token` grants.
    pub fn verify(&self, token: Option<&str>) -> Result<Scope, AuthError> {
        self.grant(token).map(|grant| grant.scope)
    }

    /// The scope `token` grants and whether it may publish (`--auth none`: everything).
    pub fn grant(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Auth::Jwt(verifier) = self else {
            return Ok(Grant { scope: Scope::everything(), emit: true });
        };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|err| match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(err.to_string()),
            })?;
        let claims = data.claims;
        let organizations =
            if claims.orgs.iter().any(|o| o == "*") { None } else { Some(claims.orgs) };
        let domains = claims.domains.filter(|d| !d.iter().any(|d| d == "*"));
        let scope = Scope { organizations, domains, expires_at: Some(claims.exp) };
        Ok(Grant { scope, emit: claims.emit })
    }

    /// Refuses `--auth none` on another address the server listens on (`--pg-listen`).
    pub fn check_listen(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        match self {
            Auth::None if !listen.ip().is_loopback() => {
                Err(ConfigError::NoneOnPublicAddress(listen))
            }
            _ => Ok(()),
        }
    }

    pub fn is_required(&self) -> bool {
        matches!(self, Auth::Jwt(_))
    }
}

/// What `rowcast token` puts in a token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MintClaims {
    pub sub: String,
    /// Seconds since the epoch.
    pub exp: u64,
    pub orgs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domains: Option<Vec<String>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub emit: bool,
}

/// The key a token is signed with: the server's HS256 secret, or the private half of its
/// RS256/ES256 public key (PEM).
pub enum SigningKey<'a> {
    Secret(&'a str),
    PrivatePem(&'a [u8]),
}

/// Signs `claims` (`rowcast token`). The secret must be one the server would accept.
pub fn mint(claims: &MintClaims, key: SigningKey<'_>) -> Result<String, ConfigError> {
    use jsonwebtoken::{EncodingKey, Header};
    let (key, algorithm) = match key {
        SigningKey::Secret(secret) if secret.len() < MIN_SECRET_BYTES => {
            return Err(ConfigError::WeakSecret);
        }
        SigningKey::Secret(secret) => {
            (EncodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
        }
        SigningKey::PrivatePem(pem) => match EncodingKey::from_rsa_pem(pem) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => match EncodingKey::from_ec_pem(pem) {
                Ok(key) => (key, Algorithm::ES256),
                Err(err) => {
                    return Err(ConfigError::BadKey(format!(
                        "not an RSA or EC private key in PEM form ({err})"
                    )));
                }
            },
        },
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key)
        .map_err(|err| ConfigError::BadKey(err.to_string()))
}

/// Browsers pass their token as this subprotocol prefix; the server answers with
/// [`PROTOCOL`].
pub const BEARER_PROTOCOL: &str = "rowcast.bearer.";
pub const PROTOCOL: &str = "rowcast.v1";

#[cfg(test)]
mod tests;
