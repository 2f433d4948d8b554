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

impl Scope {
    pub fn everything() -> Self {
        Self { organizations: None, domains: None, expires_at: None }
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
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes";

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn in_an_hour() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now").as_secs()
            + 3600
    }

    #[test]
    fn publishing_needs_the_emit_claim_and_the_scope() {
        let auth = Auth::new("jwt", Some(SECRET), None, local()).expect("jwt");
        let grant = |claims| auth.grant(Some(&token(claims, SECRET))).expect("valid");
        let reader = grant(json!({"exp": in_an_hour(), "orgs": ["quant"]}));
        assert!(!reader.emit);
        assert!(reader.may_publish(Some("quant"), None).is_err());
        let quant = grant(json!({"exp": in_an_hour(), "orgs": ["quant"], "emit": true}));
        assert!(quant.may_publish(Some("quant"), Some("any")).is_ok());
        assert!(quant.may_publish(Some("acme"), None).expect_err("foreign").contains("\"acme\""));
        assert!(quant.may_publish(None, None).is_err(), "a null organization needs [\"*\"]");
        let demo =
            grant(json!({"exp": in_an_hour(), "orgs": ["*"], "domains": ["demo"], "emit": true}));
        assert!(demo.may_publish(None, Some("demo")).is_ok());
        assert!(demo.may_publish(Some("x"), Some("prod")).is_err());
        assert!(demo.may_publish(Some("x"), None).is_err());
        let open = Auth::None.grant(None).expect("none");
        assert!(open.emit && open.may_publish(None, None).is_ok());
    }

    #[test]
    fn minted_tokens_verify_with_what_they_claim() {
        let auth = Auth::new("jwt", Some(SECRET), None, local()).expect("jwt");
        let claims = MintClaims {
            sub: "svc".into(),
            exp: in_an_hour(),
            orgs: vec!["quant".into()],
            domains: Some(vec!["demo".into()]),
            emit: true,
        };
        let minted = mint(&claims, SigningKey::Secret(SECRET)).expect("mint");
        let grant = auth.grant(Some(&minted)).expect("verifies");
        assert!(grant.emit);
        assert_eq!(grant.scope.organizations, Some(vec!["quant".to_string()]));
        assert_eq!(grant.scope.domains, Some(vec!["demo".to_string()]));
        let reader = MintClaims { emit: false, domains: None, ..claims.clone() };
        let minted = mint(&reader, SigningKey::Secret(SECRET)).expect("mint");
        assert!(!auth.grant(Some(&minted)).expect("verifies").emit);
        assert_eq!(mint(&claims, SigningKey::Secret("short")), Err(ConfigError::WeakSecret));
        assert!(mint(&claims, SigningKey::PrivatePem(b"not a key")).is_err());
    }

    #[test]
    fn none_only_on_loopback() {
        assert!(Auth::new("none", None, None, local()).is_ok());
        let public = SocketAddr::from(([0, 0, 0, 0], 8080));
        assert_eq!(
            Auth::new("none", None, None, public).err(),
            Some(ConfigError::NoneOnPublicAddress(public))
        );
        assert_eq!(Auth::new("jwt", None, None, public).err(), Some(ConfigError::NoKey));
        assert_eq!(Auth::new("jwt", Some(""), None, public).err(), Some(ConfigError::WeakSecret));
        assert_eq!(
            Auth::new("jwt", Some("short"), None, public).err(),
            Some(ConfigError::WeakSecret)
        );
        assert_eq!(
            Auth::new("jwt", Some(SECRET), Some(b"pem"), public).err(),
            Some(ConfigError::BothKeys)
        );
        assert!(matches!(
            Auth::new("jwt", None, Some(b"not a key"), public),
            Err(ConfigError::BadKey(_))
        ));
    }

    #[test]
    fn tokens_are_checked() {
        let auth = Auth::new("jwt", Some(SECRET), None, local()).expect("auth");
        let good = token(json!({"sub": "ann", "exp": in_an_hour(), "orgs": ["quant"]}), SECRET);
        let scope = auth.verify(Some(&good)).expect("valid");
        assert_eq!(scope.organizations, Some(vec!["quant".to_owned()]));
        assert_eq!(auth.verify(None), Err(AuthError::Missing));
        let forged = token(json!({"exp": in_an_hour(), "orgs": ["*"]}), "other");
        assert!(matches!(auth.verify(Some(&forged)), Err(AuthError::Invalid(_))));
        let expired = token(json!({"exp": 1_000_000, "orgs": ["*"]}), SECRET);
        assert_eq!(auth.verify(Some(&expired)), Err(AuthError::Expired));
        let no_orgs = token(json!({"exp": in_an_hour()}), SECRET);
        assert!(matches!(auth.verify(Some(&no_orgs)), Err(AuthError::Invalid(_))));
        assert!(matches!(auth.verify(Some("garbage")), Err(AuthError::Invalid(_))));
        let all = token(json!({"exp": in_an_hour(), "orgs": ["*"]}), SECRET);
        assert_eq!(auth.verify(Some(&all)).expect("valid").organizations, None);
    }

    use proptest::prelude::*;

    use crate::filter::Subject;
    use crate::model::Severity;

    const ORGS: [&str; 5] = ["quant", "acme", "globex", "", "ünï"];
    const DOMAINS: [&str; 4] = ["demo", "prod", "", "dömain"];

    fn some_of(items: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(prop::sample::select(items), 1..4)
            .prop_map(|v| v.into_iter().map(String::from).collect())
    }

    proptest! {
        /// Whatever the filter, once confined it matches nothing outside the token's scope:
        /// no foreign organization, no foreign domain, no null organization unless `*`.
        #[test]
        fn confined_filters_never_leave_the_scope(
            granted_orgs in prop::option::of(some_of(&ORGS)),
            granted_domains in prop::option::of(some_of(&DOMAINS)),
            asked_orgs in prop::option::of(some_of(&ORGS)),
            asked_domains in prop::option::of(some_of(&DOMAINS)),
            types in prop::option::of(prop::collection::vec(prop::sample::select(&["*", "agent.*", "*.deleted", "user.created"][..]), 1..3)),
            events in prop::collection::vec((prop::option::of(prop::sample::select(&ORGS[..])), prop::option::of(prop::sample::select(&DOMAINS[..])), prop::sample::select(&["agent.created", "user.deleted", "user.created"][..])), 1..50),
        ) {
            let scope = Scope { organizations: granted_orgs.clone(), domains: granted_domains.clone(), expires_at: None };
            let filter = Filter::from_json(Some(&json!({"type": types, "organization_id": asked_orgs, "domain_id": asked_domains})))
                .expect("valid filter");
            let Ok(confined) = scope.confine(filter) else {
                // Refused: it named something outside the scope.
                let outside_org = asked_orgs.iter().flatten().any(|o| !granted_orgs.as_ref().is_none_or(|g| g.contains(o)));
                let outside_domain = asked_domains.iter().flatten().any(|d| !granted_domains.as_ref().is_none_or(|g| g.contains(d)));
                prop_assert!(outside_org || outside_domain);
                return Ok(());
            };
            for (org, domain, kind) in events {
                let subject = Subject { event_type: kind, organization_id: org, domain_id: domain, severity: Severity::Info };
                if confined.matches(&subject) {
                    if let Some(granted) = &granted_orgs {
                        prop_assert!(org.is_some_and(|o| granted.iter().any(|g| g == o)), "org {org:?} leaked");
                    }
                    if let Some(granted) = &granted_domains {
                        prop_assert!(domain.is_some_and(|d| granted.iter().any(|g| g == d)), "domain {domain:?} leaked");
                    }
                }
            }
        }
    }

    #[test]
    fn rs256_and_es256_public_keys() {
        let claims = json!({"exp": in_an_hour(), "orgs": ["quant"]});
        let pairs: [(&[u8], &[u8], Algorithm); 2] = [
            (
                include_bytes!("../tests/fixtures/rsa-private.pem"),
                include_bytes!("../tests/fixtures/rsa-public.pem"),
                Algorithm::RS256,
            ),
            (
                include_bytes!("../tests/fixtures/ec-private.pem"),
                include_bytes!("../tests/fixtures/ec-public.pem"),
                Algorithm::ES256,
            ),
        ];
        for (private, public, algorithm) in pairs {
            let key = match algorithm {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(private),
                _ => EncodingKey::from_ec_pem(private),
            }
            .expect("private key");
            let signed =
                jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).expect("sign");
            let auth = Auth::new("jwt", None, Some(public), local()).expect("public key");
            let scope = auth.verify(Some(&signed)).expect("verifies");
            assert_eq!(scope.organizations, Some(vec!["quant".to_owned()]), "{algorithm:?}");
            // A token signed with the HMAC of the public key (algorithm confusion) is refused.
            let confused = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(public),
            )
            .expect("sign");
            assert!(matches!(auth.verify(Some(&confused)), Err(AuthError::Invalid(_))));
        }
    }

    #[test]
    fn scope_confines_filters() {
        let scope =
            Scope { organizations: Some(vec!["quant".into()]), domains: None, expires_at: None };
        let open = scope.confine(Filter::all()).expect("narrowed");
        assert_eq!(open.organizations(), Some(&["quant".to_owned()][..]));
        let foreign = Filter::from_json(Some(&json!({"organization_id": ["quant", "acme"]})))
            .expect("filter");
        assert!(scope.confine(foreign).expect_err("refused").contains("acme"));
    }
}
