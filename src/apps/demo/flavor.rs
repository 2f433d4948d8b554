//! The realistic-looking values simulated rows are made of: names, models, regions, errors.

use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::json;

pub const AGENT_NAMES: &[&str] = &[
    "support-assistant",
    "billing-bot",
    "triage",
    "sales-copilot",
    "onboarding-guide",
    "code-reviewer",
    "incident-responder",
    "research-analyst",
    "scheduler",
    "translator",
    "data-cleaner",
    "qa-tester",
    "doc-writer",
    "forecaster",
    "fraud-watch",
    "recruiter",
];
pub const MODELS: &[&str] =
    &["gpt-4o", "claude-sonnet-4", "llama-3.1-70b", "mistral-large", "gemini-1.5-pro"];
pub const TOOLS: &[&str] = &["search", "calendar", "crm", "sql", "email", "tickets", "code"];
pub const REGIONS: &[&str] =
    &["eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-southeast-2"];
pub const CPU_MILLIS: &[i32] = &[250, 500, 1000, 2000];
pub const MEMORY_MB: &[i32] = &[512, 1024, 2048, 4096];
pub const DEPLOYMENT_ERRORS: &[&str] = &[
    "health check failed: /readyz answered 503 for 120 s",
    "image pull failed: registry timeout",
    "container OOMKilled (memory limit reached)",
    "migration 0042 failed: lock timeout",
    "rollout exceeded its 10 min deadline",
];
const STRATEGIES: &[&str] = &["rolling", "blue-green", "canary"];
pub const PEOPLE: &[(&str, &str)] = &[
    ("Ada", "Lovelace"),
    ("Grace", "Hopper"),
    ("Alan", "Turing"),
    ("Margaret", "Hamilton"),
    ("Ken", "Thompson"),
    ("Barbara", "Liskov"),
    ("Dennis", "Ritchie"),
    ("Radia", "Perlman"),
    ("Edsger", "Dijkstra"),
    ("Frances", "Allen"),
    ("John", "McCarthy"),
    ("Katherine", "Johnson"),
    ("Hedy", "Lamarr"),
    ("Donald", "Knuth"),
    ("Leslie", "Lamport"),
    ("Sophie", "Wilson"),
];

pub fn id(rng: &mut impl Rng, prefix: &str) -> String {
    format!("{prefix}-{:08x}", rng.random::<u32>())
}

pub fn agent_config(rng: &mut impl Rng) -> String {
    let tools: Vec<&str> = TOOLS.iter().copied().filter(|_| rng.random_bool(0.4)).collect();
    json!({
        "temperature": f64::from(rng.random_range(0..=10_u8)) / 10.0,
        "max_tokens": *[1024, 2048, 4096].choose(rng).unwrap_or(&1024),
        "tools": tools,
    })
    .to_string()
}

/// A fake password hash in the usual shape; users.password_hash is redacted from events.
pub fn password_hash(rng: &mut impl Rng) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut chars = |n: usize| {
        (0..n).map(|_| char::from(B64[rng.random_range(0..B64.len())])).collect::<String>()
    };
    let salt = chars(22);
    let hash = chars(43);
    format!("$argon2id$v=19$m=19456,t=2,p=1${salt}${hash}")
}

pub fn version(rng: &mut impl Rng) -> String {
    format!("v1.{}.{}", rng.random_range(0..12_u8), rng.random_range(0..30_u8))
}

pub fn deployment_metadata(rng: &mut impl Rng, triggered_by: &str) -> String {
    json!({
        "commit": format!("{:07x}", rng.random::<u32>() >> 4),
        "strategy": STRATEGIES.choose(rng).copied().unwrap_or("rolling"),
        "triggered_by": triggered_by,
    })
    .to_string()
}
