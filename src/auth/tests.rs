//! Tokens and scopes: keys, algorithms, claims, confinement, minting.

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes";

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn token(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
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
    assert_eq!(Auth::new("jwt", Some("short"), None, public).err(), Some(ConfigError::WeakSecret));
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
            let subject = Subject { event_type: kind, organization_id: org, domain_id: domain, severity: Severity::Info, envelope: None };
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
            include_bytes!("../../tests/fixtures/rsa-private.pem"),
            include_bytes!("../../tests/fixtures/rsa-public.pem"),
            Algorithm::RS256,
        ),
        (
            include_bytes!("../../tests/fixtures/ec-private.pem"),
            include_bytes!("../../tests/fixtures/ec-public.pem"),
            Algorithm::ES256,
        ),
    ];
    for (private, public, algorithm) in pairs {
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private),
            _ => EncodingKey::from_ec_pem(private),
        }
        .expect("private key");
        let signed = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).expect("sign");
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
    let foreign =
        Filter::from_json(Some(&json!({"organization_id": ["quant", "acme"]}))).expect("filter");
    assert!(scope.confine(foreign).expect_err("refused").contains("acme"));
}
