//! Issue 14's acceptance (SPEC §5 filters and `where`, `since`, `history`, replay; §7 history
//! API): a seeded random workload over the six reference tables and application events, and
//! random filters. Everything a client can get for a filter (live, `since: 0`, `history: N`,
//! `GET /api/events`, replay) must be exactly what an independent matcher
//! (`support::matcher`) picks from the log, including on a connection that reads too slowly
//! and is fed from the log for a while. Then `history: 50` (and `?history=50`) while writes
//! go on: the 50 before `subscribed.last_id`, `caught_up`, every later one once.
//! Each test prints its seed; `ROWCAST_ACCEPT_SEED=N` repeats a run.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::client::{Incoming, Ws, get, is_event, post};
use crate::support::matcher::{as_query_reads, picked, query};
use crate::support::{Running, TestDb, connect};

const WAIT: Duration = Duration::from_secs(30);
/// How long a connection must stay silent after everything expected arrived: extras show.
const QUIET: Duration = Duration::from_millis(500);
/// How often, and after what pause, a history page answered 503 ("try again") is asked again.
const UNAVAILABLE_RETRIES: usize = 3;
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(500);
const EVER: (&str, &str) = ("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z");

const ORGS: [&str; 3] = ["acme", "quant", "zeta"];
const NAMES: [&str; 7] = ["support", "Sales bot", "triage", "router-2", "qa", "Ops", "10"];
const MODELS: [&str; 4] = ["gpt-4", "claude-3", "llama-70b", "10"];
const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "ap-south-1", "US-West-2"];
const AGENT_STATUS: [&str; 4] = ["active", "inactive", "paused", "error"];
const INSTANCE_STATUS: [&str; 4] = ["provisioning", "running", "stopped", "failed"];
const DEPLOY_STATUS: [&str; 5] = ["pending", "running", "completed", "failed", "cancelled"];
const ROLES: [&str; 3] = ["owner", "admin", "member"];
const PLANS: [&str; 3] = ["free", "team", "enterprise"];
const VERSIONS: [&str; 6] = ["1.0", "1.10", "2.3", "9", "10", "v2"];
const ERRORS: [&str; 4] = ["timeout", "out of memory", "exit 1", "Timeout: 30s"];
const TIERS: [&str; 3] = ["gold", "silver", "Bronze"];
const TAGS: [&str; 5] = ["x", "y", "gpu", "eu", "1"];
const LINES: [&str; 5] = ["step 1/7", "step 3/7 ü", "done", "error: disk full", "warn: slow"];
const LEVELS: [&str; 3] = ["info", "warn", "error"];
const SEVERITIES: [&str; 5] = ["debug", "info", "warning", "error", "critical"];
const APP_TYPES: [&str; 5] =
    ["deployment.log", "agent.heartbeat", "model.state_changed", "query.routed", "cache.miss"];

/// The seed of this run: `ROWCAST_ACCEPT_SEED` or a fresh one, printed so a failure repeats.
pub(crate) fn seed(test: &str) -> u64 {
    let seed = std::env::var("ROWCAST_ACCEPT_SEED")
        .ok()
        .map(|s| s.parse().expect("ROWCAST_ACCEPT_SEED is a number"))
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (ROWCAST_ACCEPT_SEED={seed} repeats it)");
    seed
}

/// A JSON number exactly as written (`1.0`, `1e1`).
fn raw(text: &str) -> Value {
    serde_json::from_str(text).expect("a JSON number")
}

fn domains_of(org: &str) -> [String; 2] {
    [format!("{org}-prod"), format!("{org}-dev")]
}

fn quoted(value: Option<&str>) -> String {
    value.map_or_else(|| "NULL".to_owned(), |v| format!("'{v}'"))
}

fn jsonb(value: &Value) -> String {
    format!("'{value}'::jsonb")
}

/// A random workload over the six tables, kept consistent with what exists.
pub(crate) struct Workload {
    rng: StdRng,
    next: u64,
    agents: Vec<String>,
    instances: Vec<String>,
    deployments: Vec<String>,
    users: Vec<String>,
    spare_orgs: Vec<String>,
    /// At least how many events the statements so far make.
    events: usize,
}

impl Workload {
    pub(crate) fn new(seed: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            next: 0,
            agents: Vec::new(),
            instances: Vec::new(),
            deployments: Vec::new(),
            users: Vec::new(),
            spare_orgs: Vec::new(),
            events: 0,
        }
    }

    /// Numbers new rows from `next` on, so that two workloads on one database never collide.
    pub(crate) fn starting_at(mut self, next: u64) -> Workload {
        self.next = next;
        self
    }

    pub(crate) fn seed_sql() -> String {
        let mut sql = String::new();
        for org in ORGS {
            sql += &format!("INSERT INTO organizations (id, name) VALUES ('{org}', '{org}');");
            for domain in domains_of(org) {
                sql += &format!(
                    "INSERT INTO domains (id, organization_id, name) VALUES ('{domain}', '{org}', 'D');"
                );
            }
        }
        sql
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items.choose(&mut self.rng).expect("non-empty")
    }

    fn maybe<'a>(&mut self, items: &'a [&'a str]) -> Option<&'a str> {
        self.rng.random_bool(0.7).then(|| self.pick(items))
    }

    fn scope(&mut self) -> (String, Option<String>) {
        let org = self.pick(&ORGS).to_owned();
        let domain = self.rng.random_bool(0.8).then(|| {
            let domains = domains_of(&org);
            domains[self.rng.random_range(0..2)].clone()
        });
        (org, domain)
    }

    fn number(&mut self) -> Value {
        match self.rng.random_range(0..6) {
            // The same numbers written otherwise: trailing zeros, exponents, minus zero.
            0 => {
                let texts = ["1.0", "10.00", "2.50", "1e1", "-0", "0.10", "3E0", "5.000"];
                raw(texts.choose(&mut self.rng).expect("text"))
            }
            1 => json!(self.rng.random_range(0..12)),
            2 => json!(f64::from(self.rng.random_range(0..40i32)) / 4.0),
            3 => json!(self.rng.random_range(0..12).to_string()),
            4 => Value::Null,
            _ => json!(-self.rng.random_range(1..5)),
        }
    }

    fn tags(&mut self) -> Value {
        let n = self.rng.random_range(0..4);
        let mut tags: Vec<Value> = (0..n).map(|_| json!(self.pick(&TAGS))).collect();
        if self.rng.random_bool(0.3) {
            tags.push(json!(self.rng.random_range(1..3)));
        }
        Value::Array(tags)
    }

    /// An object with a random subset of `fields`.
    fn object(&mut self, fields: Vec<(&str, Value)>) -> Value {
        let mut object = serde_json::Map::new();
        for (key, value) in fields {
            if self.rng.random_bool(0.7) {
                object.insert(key.to_owned(), value);
            }
        }
        Value::Object(object)
    }

    fn config(&mut self) -> Value {
        let temperature = if self.rng.random_bool(0.8) {
            json!(f64::from(self.rng.random_range(0..=10i32)) / 10.0)
        } else {
            json!("0.5")
        };
        let fields = vec![
            ("temperature", temperature),
            ("tier", json!(self.pick(&TIERS))),
            ("tags", self.tags()),
            ("limits", json!({"rpm": ([10, 100, 1000][self.rng.random_range(0..3)])})),
        ];
        self.object(fields)
    }

    fn metadata(&mut self) -> Value {
        let fields = vec![
            ("tier", json!(self.pick(&TIERS))),
            ("n", self.number()),
            ("tags", self.tags()),
            ("attempt", json!(self.rng.random_range(1..4))),
            ("ci", json!({"run": self.rng.random_range(90..110) * 5})),
        ];
        self.object(fields)
    }

    /// One statement and at least how many events it makes.
    fn statement(&mut self) -> (String, usize) {
        let choice = self.rng.random_range(0..100);
        match choice {
            0..10 => {
                let id = self.id("a");
                let (org, domain) = self.scope();
                let name = self.pick(&NAMES);
                let status = self.pick(&AGENT_STATUS);
                let model = self.maybe(&MODELS);
                let config = self.config();
                self.agents.push(id.clone());
                let sql = format!(
                    "INSERT INTO agents (id, organization_id, domain_id, name, status, model, config)
                     VALUES ('{id}', '{org}', {}, '{name}', '{status}', {}, {})",
                    quoted(domain.as_deref()),
                    quoted(model),
                    jsonb(&config)
                );
                (sql, 1)
            }
            10..22 if !self.agents.is_empty() => {
                let id = self.agents.choose(&mut self.rng).expect("agent").clone();
                let mut sets = Vec::new();
                if self.rng.random_bool(0.5) {
                    sets.push(format!("status = '{}'", self.pick(&AGENT_STATUS)));
                }
                if self.rng.random_bool(0.3) {
                    sets.push(format!("model = {}", quoted(self.maybe(&MODELS))));
                }
                if self.rng.random_bool(0.3) {
                    sets.push(format!("config = {}", jsonb(&self.config())));
                }
                if self.rng.random_bool(0.2) {
                    sets.push("last_seen_at = now()".to_owned());
                }
                if sets.is_empty() {
                    sets.push(format!("name = '{}'", self.pick(&NAMES)));
                }
                (format!("UPDATE agents SET {} WHERE id = '{id}'", sets.join(", ")), 1)
            }
            22..25 if !self.agents.is_empty() => {
                let at = self.rng.random_range(0..self.agents.len());
                let id = self.agents.swap_remove(at);
                (format!("DELETE FROM agents WHERE id = '{id}'"), 1)
            }
            25..35 => {
                let id = self.id("i");
                let (org, domain) = self.scope();
                let agent = self.agents.choose(&mut self.rng).cloned();
                let region = self.pick(&REGIONS);
                let status = self.pick(&INSTANCE_STATUS);
                let cpu = [250, 500, 1000, 2000, 4000][self.rng.random_range(0..5)];
                let memory = [256, 512, 1024, 2048][self.rng.random_range(0..4)];
                let metadata = self.metadata();
                self.instances.push(id.clone());
                let sql = format!(
                    "INSERT INTO instances (id, organization_id, domain_id, agent_id, region, status,
                                            cpu_millis, memory_mb, metadata)
                     VALUES ('{id}', '{org}', {}, {}, '{region}', '{status}', {cpu}, {memory}, {})",
                    quoted(domain.as_deref()),
                    quoted(agent.as_deref()),
                    jsonb(&metadata)
                );
                (sql, 1)
            }
            35..47 if !self.instances.is_empty() => {
                let id = self.instances.choose(&mut self.rng).expect("instance").clone();
                let mut sets = Vec::new();
                if self.rng.random_bool(0.5) {
                    sets.push(format!("status = '{}'", self.pick(&INSTANCE_STATUS)));
                }
                if self.rng.random_bool(0.3) {
                    sets.push(format!(
                        "cpu_millis = cpu_millis + {}",
                        self.rng.random_range(-1..3)
                    ));
                }
                if self.rng.random_bool(0.3) {
                    sets.push(format!("metadata = {}", jsonb(&self.metadata())));
                }
                if sets.is_empty() {
                    sets.push(format!("region = '{}'", self.pick(&REGIONS)));
                }
                (format!("UPDATE instances SET {} WHERE id = '{id}'", sets.join(", ")), 1)
            }
            47..50 if !self.instances.is_empty() => {
                let at = self.rng.random_range(0..self.instances.len());
                let id = self.instances.swap_remove(at);
                (format!("DELETE FROM instances WHERE id = '{id}'"), 1)
            }
            50..58 => {
                let id = self.id("d");
                let (org, domain) = self.scope();
                let agent = self.agents.choose(&mut self.rng).cloned();
                let version = self.pick(&VERSIONS);
                let status = self.pick(&DEPLOY_STATUS);
                let error = if status == "failed" { self.maybe(&ERRORS) } else { None };
                let metadata = self.metadata();
                self.deployments.push(id.clone());
                let extra = usize::from(["running", "completed", "failed"].contains(&status));
                let sql = format!(
                    "INSERT INTO deployments (id, organization_id, domain_id, agent_id, version,
                                              status, error, metadata)
                     VALUES ('{id}', '{org}', {}, {}, '{version}', '{status}', {}, {})",
                    quoted(domain.as_deref()),
                    quoted(agent.as_deref()),
                    quoted(error),
                    jsonb(&metadata)
                );
                (sql, 1 + extra)
            }
            58..72 if !self.deployments.is_empty() => {
                let id = self.deployments.choose(&mut self.rng).expect("deployment").clone();
                let status = self.pick(&DEPLOY_STATUS);
                let mut sets = vec![format!("status = '{status}'")];
                match status {
                    "running" => sets.push("started_at = now()".to_owned()),
                    "failed" => {
                        sets.push(format!("error = {}", quoted(self.maybe(&ERRORS))));
                        sets.push("finished_at = now()".to_owned());
                    }
                    "completed" => sets.push("finished_at = now(), error = NULL".to_owned()),
                    _ => {}
                }
                if self.rng.random_bool(0.2) {
                    sets.push(format!("version = '{}'", self.pick(&VERSIONS)));
                }
                (format!("UPDATE deployments SET {} WHERE id = '{id}'", sets.join(", ")), 1)
            }
            72..74 if !self.deployments.is_empty() => {
                let at = self.rng.random_range(0..self.deployments.len());
                let id = self.deployments.swap_remove(at);
                (format!("DELETE FROM deployments WHERE id = '{id}'"), 1)
            }
            74..80 => {
                let id = self.id("u");
                let org = self.pick(&ORGS);
                let name = self.pick(&NAMES);
                let role = self.pick(&ROLES);
                self.users.push(id.clone());
                let sql = format!(
                    "INSERT INTO users (id, organization_id, email, name, role, password_hash)
                     VALUES ('{id}', '{org}', '{id}@x.io', '{name}', '{role}', 'secret-{id}')"
                );
                (sql, 1)
            }
            80..86 if !self.users.is_empty() => {
                let id = self.users.choose(&mut self.rng).expect("user").clone();
                let set = match self.rng.random_range(0..3) {
                    0 => format!("role = '{}'", self.pick(&ROLES)),
                    1 => "last_login_at = now()".to_owned(),
                    _ => "password_hash = md5(random()::text)".to_owned(),
                };
                (format!("UPDATE users SET {set} WHERE id = '{id}'"), 1)
            }
            86..88 if !self.users.is_empty() => {
                let at = self.rng.random_range(0..self.users.len());
                let id = self.users.swap_remove(at);
                (format!("DELETE FROM users WHERE id = '{id}'"), 1)
            }
            88..92 => {
                let org = self.pick(&ORGS);
                let settings = json!({"quota": ([10, 100][self.rng.random_range(0..2)]), "beta": self.rng.random_bool(0.5)});
                let sql = format!(
                    "UPDATE organizations SET plan = '{}', settings = {} WHERE id = '{org}'",
                    self.pick(&PLANS),
                    jsonb(&settings)
                );
                (sql, 1)
            }
            92..96 => {
                let org = self.pick(&ORGS);
                let domain = domains_of(org)[self.rng.random_range(0..2)].clone();
                let description = self.maybe(&LINES);
                let sql = format!(
                    "UPDATE domains SET description = {} WHERE id = '{domain}'",
                    quoted(description)
                );
                (sql, 1)
            }
            96..98 if !self.spare_orgs.is_empty() => {
                let id = self.spare_orgs.pop().expect("spare");
                (format!("DELETE FROM organizations WHERE id = '{id}'"), 1)
            }
            _ => {
                let id = self.id("org");
                self.spare_orgs.push(id.clone());
                let plan = self.pick(&PLANS);
                (
                    format!(
                        "INSERT INTO organizations (id, name, plan) VALUES ('{id}', 'Spare', '{plan}')"
                    ),
                    1,
                )
            }
        }
    }

    /// One transaction of 1 to 4 statements.
    pub(crate) fn transaction(&mut self) -> String {
        let n = self.rng.random_range(1..=4);
        let mut sql = String::from("BEGIN;");
        for _ in 0..n {
            let (statement, events) = self.statement();
            sql += &statement;
            sql += ";";
            self.events += events;
        }
        sql + "COMMIT"
    }

    fn app_data(&mut self) -> Value {
        let fields = vec![
            ("line", json!(self.pick(&LINES))),
            ("level", json!(self.pick(&LEVELS))),
            ("n", self.number()),
            ("status", json!(self.pick(&["ok", "failed", "running", "10"]))),
            ("tags", self.tags()),
            (
                "ctx",
                json!({"k": (vec![json!("a"), json!("B"), json!(1), Value::Null].swap_remove(self.rng.random_range(0..4)))}),
            ),
            ("ok", json!(self.rng.random_bool(0.5))),
            ("cpu_millis", json!([999, 1000, 1001][self.rng.random_range(0..3)])),
        ];
        self.object(fields)
    }

    /// A `POST /api/events` body of 1 to 15 application events.
    pub(crate) fn app_events(&mut self) -> Value {
        let n = self.rng.random_range(1..=15);
        let events: Vec<Value> = (0..n)
            .map(|_| {
                let mut event = json!({"type": self.pick(&APP_TYPES), "data": self.app_data()});
                if self.rng.random_bool(0.7) {
                    let (org, domain) = self.scope();
                    event["organization_id"] = json!(org);
                    if let Some(domain) = domain {
                        event["domain_id"] = json!(domain);
                    }
                }
                if self.rng.random_bool(0.4) {
                    event["severity"] = json!(self.pick(&SEVERITIES));
                }
                event
            })
            .collect();
        self.events += n;
        json!({"events": events})
    }
}

/// Runs a workload of at least `events` events: transactions and application events.
async fn write(db: &TestDb, server: &Running, workload: &mut Workload, events: usize) {
    let client = db.client().await;
    while workload.events < events {
        if workload.rng.random_bool(0.15) {
            let body = workload.app_events().to_string();
            let (status, reply) = post(server.addr, "/api/events", None, body.as_bytes()).await;
            assert_eq!(status, 201, "{body}: {reply}");
        } else {
            let sql = workload.transaction();
            client.batch_execute(&sql).await.unwrap_or_else(|err| panic!("{sql}: {err}"));
        }
    }
}

/// Fields a filter can name, with values the workload gives them (and some it does not).
pub(crate) fn fields() -> HashMap<&'static str, Vec<Value>> {
    let strings = |items: &[&str]| items.iter().map(|s| json!(s)).collect::<Vec<_>>();
    let with = |mut items: Vec<Value>, more: Vec<Value>| {
        items.extend(more);
        items
    };
    let statuses: Vec<&str> = AGENT_STATUS
        .iter()
        .chain(&INSTANCE_STATUS)
        .chain(&DEPLOY_STATUS)
        .chain(&["ok", "10"])
        .copied()
        .collect();
    vec![
        ("status", with(strings(&statuses), vec![json!(10)])),
        ("model", with(strings(&MODELS), vec![json!(10), json!("gpt")])),
        ("region", with(strings(&REGIONS), vec![json!(5), json!("us"), json!("eu-west-1")])),
        (
            "cpu_millis",
            vec![json!(250), json!(500), json!(1000), raw("1000.0"), json!(999.5), json!("1000")],
        ),
        ("memory_mb", vec![json!(256), json!(512), json!(1024), json!(2048)]),
        ("version", with(strings(&VERSIONS), vec![json!(9), json!(10), json!(1.1)])),
        ("error", with(strings(&ERRORS), vec![json!("out"), json!("Time"), json!("t")])),
        ("role", strings(&ROLES)),
        ("plan", strings(&PLANS)),
        ("name", with(strings(&NAMES), vec![json!("o"), json!("S"), json!(10)])),
        ("email", vec![json!("@x.io"), json!("u1")]),
        ("description", with(strings(&LINES), vec![json!("step")])),
        ("domain_id", strings(&["acme-prod", "quant-dev", "zeta-prod"])),
        ("organization_id", strings(&ORGS)),
        ("agent_id", strings(&["a1", "a5", "a"])),
        ("id", strings(&["a", "i", "d1", "org"])),
        ("config.temperature", vec![json!(0.2), json!(0.5), json!(0.8), json!("0.5"), json!(1)]),
        ("config.tier", strings(&TIERS)),
        ("config.tags", with(strings(&TAGS), vec![json!(1), json!(2)])),
        ("config.limits.rpm", vec![json!(10), json!(100), json!(1000)]),
        ("metadata.tier", with(strings(&TIERS), vec![json!("gold")])),
        (
            "metadata.n",
            vec![json!(1), raw("2.50"), json!(3), json!("3"), raw("1e1"), json!(-2), raw("0.0")],
        ),
        ("metadata.tags", with(strings(&TAGS), vec![json!(1), json!(2)])),
        ("metadata.attempt", vec![json!(1), json!(2), json!(3)]),
        ("metadata.ci.run", vec![json!(450), json!(500), json!(520)]),
        ("settings.quota", vec![json!(10), json!(100)]),
        ("settings.beta", vec![json!(true), json!(false)]),
        ("last_login_at", vec![]),
        ("last_seen_at", vec![]),
        ("started_at", vec![]),
        ("line", with(strings(&LINES), vec![json!("step"), json!("/7")])),
        ("level", strings(&LEVELS)),
        ("n", vec![json!(0), raw("5.0"), json!(10), json!("5"), json!(7.5), json!(-1), raw("0.1")]),
        ("tags", with(strings(&TAGS), vec![json!(1)])),
        ("ctx.k", vec![json!("a"), json!("B"), json!(1)]),
        ("ok", vec![json!(true), json!(false)]),
        ("nope", vec![json!("x"), json!(1)]),
        ("ctx.k.deeper", vec![json!("a")]),
    ]
    .into_iter()
    .collect()
}

/// What a filter aims at: an entity with the fields its events carry and the columns that can
/// be in their `changed`, and the event types it has.
struct Target {
    entity: &'static str,
    fields: &'static [&'static str],
    columns: &'static [&'static str],
    actions: &'static [&'static str],
}

const ROW_ACTIONS: [&str; 3] = ["created", "updated", "deleted"];
const TARGETS: [Target; 7] = [
    Target {
        entity: "organization",
        fields: &["plan", "settings.quota", "settings.beta", "name", "id"],
        columns: &["plan", "settings"],
        actions: &ROW_ACTIONS,
    },
    Target {
        entity: "domain",
        fields: &["description", "organization_id", "id"],
        columns: &["description"],
        actions: &ROW_ACTIONS,
    },
    Target {
        entity: "agent",
        fields: &[
            "status",
            "model",
            "name",
            "config.temperature",
            "config.tier",
            "config.tags",
            "config.limits.rpm",
            "last_seen_at",
            "domain_id",
            "id",
        ],
        columns: &["status", "model", "config", "name", "last_seen_at"],
        actions: &["created", "updated", "deleted", "status_changed"],
    },
    Target {
        entity: "instance",
        fields: &[
            "status",
            "region",
            "cpu_millis",
            "memory_mb",
            "metadata.tier",
            "metadata.n",
            "metadata.tags",
            "agent_id",
            "domain_id",
        ],
        columns: &["status", "region", "cpu_millis", "metadata", "agent_id"],
        actions: &["created", "updated", "deleted", "status_changed"],
    },
    Target {
        entity: "deployment",
        fields: &[
            "status",
            "version",
            "error",
            "started_at",
            "metadata.attempt",
            "metadata.ci.run",
            "metadata.n",
            "agent_id",
        ],
        columns: &["status", "version", "error", "started_at", "finished_at", "agent_id"],
        actions: &["created", "updated", "deleted", "started", "completed", "failed", "log"],
    },
    Target {
        entity: "user",
        fields: &["role", "email", "name", "last_login_at"],
        columns: &["role", "last_login_at"],
        actions: &ROW_ACTIONS,
    },
    Target {
        entity: "*",
        fields: &["line", "level", "n", "tags", "ctx.k", "ok", "status", "cpu_millis"],
        columns: &["status"],
        actions: &["log", "heartbeat", "state_changed", "routed", "miss"],
    },
];

fn type_pattern(rng: &mut StdRng, target: &Target) -> Value {
    let action = *target.actions.choose(rng).expect("action");
    let entity = if target.entity == "*" {
        let app = APP_TYPES.iter().find(|t| t.ends_with(&format!(".{action}"))).expect("app");
        app.split_once('.').expect("dot").0
    } else {
        target.entity
    };
    match rng.random_range(0..4) {
        0 => json!(format!("{entity}.*")),
        1 => json!(format!("*.{action}")),
        _ => json!(format!("{entity}.{action}")),
    }
}

fn predicate(rng: &mut StdRng, fields: &HashMap<&str, Vec<Value>>, target: &Target) -> Value {
    let path = match rng.random_range(0..20) {
        0 => *["nope", "ctx.k.deeper", "metadata.n", "status"].choose(rng).expect("path"),
        1..3 => *TARGETS.choose(rng).expect("target").fields.choose(rng).expect("field"),
        _ => *target.fields.choose(rng).expect("field"),
    };
    // Keys that are never there: most interesting with is_null.
    let missing = ["nope", "ctx.k.deeper"].contains(&path);
    let pool = &fields[path];
    let old = target.entity != "*" && rng.random_bool(0.2);
    let path = if old { format!("old.{path}") } else { path.to_owned() };
    let ops =
        ["eq", "neq", "in", "nin", "lt", "lte", "gt", "gte", "is_null", "contains", "changed"];
    let op = if pool.is_empty() || (missing && rng.random_bool(0.5)) {
        ["is_null", "changed"][rng.random_range(0..2)]
    } else {
        *ops.choose(rng).expect("op")
    };
    let ordered: Vec<&Value> = pool.iter().filter(|v| !v.is_boolean()).collect();
    match op {
        "changed" => json!([target.columns.choose(rng).expect("column"), "changed"]),
        "is_null" => json!([path, "is_null", rng.random_bool(0.5)]),
        "in" | "nin" => {
            let n = rng.random_range(1..=3.min(pool.len()));
            let items: Vec<Value> = pool.choose_multiple(rng, n).cloned().collect();
            json!([path, op, items])
        }
        "lt" | "lte" | "gt" | "gte" if !ordered.is_empty() => {
            json!([path, op, ordered.choose(rng).expect("ordered")])
        }
        "contains" => {
            // An element of an array, or a substring (rarely a number: then nothing).
            let arrays = ["config.tags", "metadata.tags", "tags", "metadata.n"];
            let strings: Vec<&Value> = pool.iter().filter(|v| v.is_string()).collect();
            let mut operand = match strings.choose(rng) {
                Some(s)
                    if !arrays.contains(&path.trim_start_matches("old."))
                        || rng.random_bool(0.3) =>
                {
                    (*s).clone()
                }
                _ => pool.choose(rng).expect("pool").clone(),
            };
            if let Some(s) = operand.as_str().filter(|_| rng.random_bool(0.5)) {
                let chars: Vec<char> = s.chars().collect();
                let from = rng.random_range(0..chars.len());
                let to = rng.random_range(from + 1..=chars.len());
                operand = json!(chars[from..to].iter().collect::<String>());
            }
            json!([path, "contains", operand])
        }
        _ => json!([path, if op.starts_with('n') { "neq" } else { "eq" }, pool.choose(rng)]),
    }
}

/// A random filter aimed at one target: maybe types, organizations, domains, a severity; 1 to 3
/// predicates, mostly over the target's fields.
pub(crate) fn filter(rng: &mut StdRng, fields: &HashMap<&str, Vec<Value>>) -> Value {
    let target = TARGETS.choose(rng).expect("target");
    let mut filter = json!({});
    match rng.random_range(0..10) {
        0..3 => {}
        3..8 => filter["type"] = type_pattern(rng, target),
        8 => filter["type"] = json!("*"),
        _ => {
            let other = TARGETS.choose(rng).expect("target");
            filter["type"] = json!([type_pattern(rng, target), type_pattern(rng, other)]);
        }
    }
    match rng.random_range(0..10) {
        0 => filter["organization_id"] = json!(ORGS.choose(rng)),
        1..3 => filter["organization_id"] = json!(ORGS.choose_multiple(rng, 2).collect::<Vec<_>>()),
        _ => {}
    }
    if rng.random_bool(0.1) {
        let org = ORGS.choose(rng).expect("org");
        let domains = domains_of(org);
        filter["domain_id"] = if rng.random_bool(0.5) { json!(domains[0]) } else { json!(domains) };
    }
    if rng.random_bool(0.15) {
        filter["severity"] = json!(SEVERITIES[..4].choose(rng));
    }
    let n = [1, 1, 1, 2, 2, 3][rng.random_range(0..6)];
    filter["where"] = Value::Array((0..n).map(|_| predicate(rng, fields, target)).collect());
    filter
}

/// What a connection received, split by subscription and replay.
#[derive(Default)]
struct Split {
    /// Subscription id by the `ref` its subscribe carried, with `subscribed.last_id`.
    subscribed: HashMap<u64, (String, u64)>,
    /// Event ids per subscription, in arrival order.
    events: HashMap<String, Vec<u64>>,
    /// Per subscription: how many of its events came before `caught_up`, and its `last_id`.
    caught_up: HashMap<String, (usize, u64)>,
    /// Replay id by `ref`, with `replay_started.total`.
    replays: HashMap<u64, (String, u64)>,
    /// Event ids per replay.
    replayed: HashMap<String, Vec<u64>>,
    /// `replay_finished.sent` per replay.
    finished: HashMap<String, u64>,
    lagging: usize,
    /// Each event as received, without `subscription_ids` or `replay_id`: it must be the log's.
    bodies: HashMap<u64, Value>,
    /// How many frames carried each event (replays aside).
    frames: HashMap<u64, usize>,
}

impl Split {
    fn absorb(&mut self, frame: Value) {
        let kind = frame["type"].as_str().expect("frames have a type");
        let name = |field: &str| frame[field].as_str().expect("id").to_owned();
        let number = |field: &str| frame[field].as_u64().unwrap_or_else(|| panic!("{frame}"));
        match kind {
            "subscribed" => {
                self.subscribed.insert(number("ref"), (name("subscription_id"), number("last_id")));
            }
            "caught_up" => {
                let id = name("subscription_id");
                let before = self.events.get(&id).map_or(0, Vec::len);
                let last_id = number("last_id");
                assert!(
                    self.caught_up.insert(id, (before, last_id)).is_none(),
                    "a second caught_up: {frame}"
                );
            }
            "replay_started" => {
                self.replays.insert(number("ref"), (name("replay_id"), number("total")));
            }
            "replay_finished" => {
                self.finished.insert(name("replay_id"), number("sent"));
            }
            "lagging" => self.lagging += 1,
            "error" | "reset" | "replay_failed" => panic!("unexpected {frame}"),
            _ if is_event(&frame) => {
                let id = number("id");
                let mut body = frame.clone();
                let object = body.as_object_mut().expect("object");
                if let Some(replay) = object.remove("replay_id") {
                    let replay = replay.as_str().expect("replay id").to_owned();
                    self.replayed.entry(replay).or_default().push(id);
                } else {
                    let subscriptions = frame["subscription_ids"].as_array().expect("tagged");
                    assert!(!subscriptions.is_empty(), "{frame}");
                    for subscription in subscriptions {
                        let subscription = subscription.as_str().expect("subscription id");
                        self.events.entry(subscription.to_owned()).or_default().push(id);
                    }
                    object.remove("subscription_ids");
                    *self.frames.entry(id).or_default() += 1;
                }
                self.bodies.insert(id, body);
            }
            _ => {}
        }
    }

    /// Every event received is the log's envelope (plus the tags taken off it).
    fn check_bodies(&self, what: &str, log: &[Value]) {
        let by_id: HashMap<u64, &Value> =
            log.iter().map(|e| (e["id"].as_u64().expect("id"), e)).collect();
        for (id, body) in &self.bodies {
            assert_eq!(Some(&body), by_id.get(id), "{what}: event {id} as sent and as logged");
        }
    }

    /// Events sent in more than one frame.
    fn sent_twice(&self) -> Vec<u64> {
        let mut ids: Vec<u64> =
            self.frames.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }

    /// The subscription made with `ref` `index`.
    fn subscription(&self, index: usize) -> &str {
        &self.subscribed[&(index as u64)].0
    }

    fn events_of(&self, index: usize) -> &[u64] {
        self.events.get(self.subscription(index)).map_or(&[], Vec::as_slice)
    }

    /// Reads until `done` holds, then for `QUIET` more. After `WAIT` it says so and returns:
    /// the caller's comparison shows what is missing.
    async fn read_until(&mut self, ws: &mut Ws, what: &str, done: impl Fn(&Split) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = None;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                eprintln!("{what}: still incomplete after {WAIT:?}; the last frame: {last:?}");
                return;
            }
            match ws.next_within(left).await {
                Some(Incoming::Frame(frame)) => {
                    last = Some(frame.to_string());
                    self.absorb(frame);
                }
                Some(Incoming::Closed(close)) => panic!("{what}: connection closed {close:?}"),
                None => {
                    eprintln!("{what}: still incomplete after {WAIT:?}; the last frame: {last:?}");
                    return;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while let Some(incoming) = ws.next_within(QUIET).await {
            match incoming {
                Incoming::Frame(frame) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{what}: frames keep coming after everything expected: {frame}"
                    );
                    self.absorb(frame);
                }
                Incoming::Closed(close) => panic!("{what}: connection closed {close:?}"),
            }
        }
    }
}

/// Keeps reading `ws` into `split` until `stop`; hands both back.
/// With a `pause` after each frame, the reader falls behind.
fn keep_reading(
    mut ws: Ws,
    mut split: Split,
    stop: CancellationToken,
    pause: Duration,
) -> JoinHandle<(Ws, Split)> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return (ws, split),
                incoming = ws.next_within(Duration::from_secs(300)) => match incoming {
                    Some(Incoming::Frame(frame)) => split.absorb(frame),
                    other => panic!("the connection ended: {other:?}"),
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    })
}

/// A fresh connection with one subscription per filter (`ref` = its index), each request
/// completed by `extra(index)`; returns once every `subscribed` is in.
async fn subscribe_all(
    server: &Running,
    filters: &[Value],
    extra: impl Fn(usize) -> Value,
) -> (Ws, Split) {
    let (ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    subscribe_all_on(ws, filters, extra).await
}

/// `subscribe_all` on a connection that is welcomed already.
async fn subscribe_all_on(
    mut ws: Ws,
    filters: &[Value],
    extra: impl Fn(usize) -> Value,
) -> (Ws, Split) {
    for (index, filter) in filters.iter().enumerate() {
        let mut request = json!({"action": "subscribe", "filter": filter, "ref": index});
        if let Value::Object(more) = extra(index) {
            request.as_object_mut().expect("object").extend(more);
        }
        ws.send(request).await;
    }
    let mut split = Split::default();
    let n = filters.len();
    split.read_until(&mut ws, "subscribed", |s| s.subscribed.len() == n).await;
    (ws, split)
}

/// Every page of `GET /api/events?QUERY`, following `next`.
async fn history_api(server: &Running, query: &str, limit: usize) -> Vec<u64> {
    let (mut ids, mut since) = (Vec::new(), 0);
    loop {
        let path = format!("/api/events?{query}&limit={limit}&since={since}");
        let (mut status, mut body) = get(server.addr, &path).await;
        // 503 says "try again" (the log did not answer in time on a loaded machine): a client
        // does, a few times.
        for _ in 0..UNAVAILABLE_RETRIES {
            if status != 503 {
                break;
            }
            tokio::time::sleep(UNAVAILABLE_PAUSE).await;
            (status, body) = get(server.addr, &path).await;
        }
        assert_eq!(status, 200, "{path}: {body}");
        let events = body["events"].as_array().expect("events");
        let next = body["next"].as_u64().expect("next");
        if events.is_empty() {
            assert_eq!(next, since, "{path}: an empty page's next is its since");
            return ids;
        }
        assert!(events.len() <= limit, "{path}: more than the limit");
        ids.extend(events.iter().map(|e| e["id"].as_u64().expect("id")));
        assert_eq!(Some(&next), ids.last(), "{path}: next is the last id of the page");
        since = next;
    }
}

/// Replays every filter over all time at speed 100 on one connection, as many at once as the
/// server allows; returns the replay's events, and its `total` and `sent`, per filter.
async fn replay_all(
    server: &Running,
    filters: &[Value],
    log: &[Value],
) -> Vec<(Vec<u64>, u64, u64)> {
    const AT_ONCE: usize = 4;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    let mut split = Split::default();
    let request = |index: usize| {
        json!({"action": "replay", "filter": filters[index], "from": EVER.0, "to": EVER.1,
               "speed": 100, "ref": index})
    };
    let mut sent = 0;
    while sent < filters.len().min(AT_ONCE) {
        ws.send(request(sent)).await;
        sent += 1;
    }
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    while split.finished.len() < filters.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_within(left).await {
            Some(Incoming::Frame(frame)) => {
                let finished = frame["type"] == "replay_finished";
                split.absorb(frame);
                if finished && sent < filters.len() {
                    ws.send(request(sent)).await;
                    sent += 1;
                }
            }
            other => panic!("replays: {other:?} with {} finished", split.finished.len()),
        }
    }
    split.check_bodies("replay", log);
    (0..filters.len())
        .map(|index| {
            let (replay, total) = split.replays[&(index as u64)].clone();
            let events = split.replayed.get(&replay).cloned().unwrap_or_default();
            (events, total, split.finished[&replay])
        })
        .collect()
}

/// How many of the last matching events `history: N` asks for, per filter: all of them, fewer,
/// more than there are, or the most allowed.
fn history_sizes(rng: &mut StdRng, expected: &[Vec<u64>]) -> Vec<usize> {
    expected
        .iter()
        .map(|ids| match rng.random_range(0..4) {
            0 => 1000,
            1 => (ids.len() / 2).clamp(1, 1000),
            2 => rng.random_range(1..=10),
            _ => (ids.len() + 5).min(1000),
        })
        .collect()
}

/// How many random filters the first test checks (eight fixed ones join them; a connection
/// holds at most 100 subscriptions).
const RANDOM_FILTERS: usize = 90;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_filters_pick_what_the_spec_says_everywhere() {
    let seed = seed("random_filters_pick_what_the_spec_says_everywhere");
    let started = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let fields = fields();
    let mut filters: Vec<Value> = (0..RANDOM_FILTERS).map(|_| filter(&mut rng, &fields)).collect();
    // Two broad ones: more than `history`'s 1000, and every severity.
    filters.push(json!({"where": [["id", "is_null", false]]}));
    filters.push(json!({"severity": "debug", "where": [["nope", "is_null", true]]}));
    // Numbers equal however they are written (the events below write them in many ways).
    filters.push(json!({"type": "query.routed", "where": [["n", "eq", 10]]}));
    filters.push(json!({"type": "query.routed", "where": [["n", "in", [0, 2.5]]]}));
    filters.push(json!({"type": "query.routed", "where": [["n", "eq", 1e1]]}));
    filters.push(json!({"type": "query.routed", "where": [["n", "neq", 10], ["n", "gte", 0]]}));
    filters.push(json!({"type": "query.routed", "where": [["n", "nin", [2.50, "10"]]]}));
    filters.push(json!({"type": "query.routed", "where": [["n", "eq", "10"]]}));

    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    // Small outbound queues: a connection that reads slowly overflows its queue and is fed
    // from the log (with the same predicates) until it catches up.
    settings.server.outbound_bytes = 64 << 10;
    let mut server = Running::start(settings).await;
    db.client().await.batch_execute(&Workload::seed_sql()).await.expect("seed");
    db.settled_events().await;

    // (a) Live: subscribed before the writes, on a connection that keeps up and on one with a
    // small receive buffer that reads a frame every 20 ms while the writes go on.
    let (ws, split) = subscribe_all(&server, &filters, |_| json!({})).await;
    let stop = CancellationToken::new();
    let live = keep_reading(ws, split, stop.clone(), Duration::ZERO);
    let mut ws = Ws::connect_small(server.addr, &server.ws_url(""), 4096).await;
    assert_eq!(ws.frame().await["type"], "welcome");
    let (ws, split) = subscribe_all_on(ws, &filters, |_| json!({})).await;
    let slow = keep_reading(ws, split, stop.clone(), Duration::from_millis(20));
    let mut workload = Workload::new(rng.random());
    write(&db, &server, &mut workload, 2300).await;
    let numbers =
        ["10", "10.0", "1e1", "10.00", "1.0E+1", "\"10\"", "0", "-0", "0.0", "2.5", "2.50"];
    let events: Vec<Value> =
        numbers.iter().map(|n| json!({"type": "query.routed", "data": {"n": raw(n)}})).collect();
    let body = json!({ "events": events }).to_string();
    let (status, reply) = post(server.addr, "/api/events", None, body.as_bytes()).await;
    assert_eq!(status, 201, "{reply}");
    // A burst of big application events: more than the slow reader's socket buffers and its
    // queue hold, so it falls behind and is fed from the log.
    for _ in 0..4 {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let data = json!({"n": i, "blob": "x".repeat(60_000)});
                json!({"type": "cache.miss", "organization_id": ORGS[i % 3], "data": data})
            })
            .collect();
        let body = json!({ "events": events }).to_string();
        let (status, reply) = post(server.addr, "/api/events", None, body.as_bytes()).await;
        assert_eq!(status, 201, "{reply}");
    }
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;
    eprintln!("{} events written in {:?}", log.len(), started.elapsed());
    assert!(log.len() >= 2000, "the workload made {} events", log.len());

    let expected: Vec<Vec<u64>> = filters.iter().map(|f| picked(f, &log)).collect();
    for (filter, ids) in filters.iter().zip(&expected) {
        eprintln!("{:5} {filter}", ids.len());
    }
    // Random filters often pick nothing (which tests something too), but at least 30 pick some.
    let picking = expected[..RANDOM_FILTERS].iter().filter(|ids| !ids.is_empty()).count();
    eprintln!("{picking} of {RANDOM_FILTERS} random filters pick something");
    assert!(picking >= 30, "only {picking} random filters pick something");
    assert!(expected.iter().any(|ids| ids.len() > 1000), "one picks more than history's 1000");

    stop.cancel();
    for (what, reader) in [("live", live), ("live, read slowly", slow)] {
        let (mut ws, mut split) = reader.await.expect("live reader");
        // Every matching event after `subscribed.last_id`.
        let after = |index: usize| {
            let last_id = split.subscribed[&(index as u64)].1;
            expected[index].iter().copied().filter(|id| *id > last_id).collect::<Vec<u64>>()
        };
        let want: Vec<Vec<u64>> = (0..filters.len()).map(after).collect();
        split
            .read_until(&mut ws, what, |s| {
                (0..filters.len()).all(|i| s.events_of(i).len() >= want[i].len())
            })
            .await;
        eprintln!("{what} checked at {:?} ({} lagging frames)", started.elapsed(), split.lagging);
        for (index, (filter, want)) in filters.iter().zip(&want).enumerate() {
            assert_eq!(split.events_of(index), want, "seed {seed}: {what} {filter}");
        }
        split.check_bodies(what, &log);
        // SPEC §5: an event matching several subscriptions of one connection is sent once.
        assert_eq!(split.sent_twice(), [0u64; 0], "seed {seed}: {what}: events sent twice");
        if what == "live, read slowly" {
            // This server announces it (SPEC §5 allows it to); without it nothing lagged.
            assert!(split.lagging > 0, "the slow reader never fell behind: the test is void");
        }
    }

    // (b) `since: 0` on a fresh connection.
    let (mut ws, mut split) = subscribe_all(&server, &filters, |_| json!({"since": 0})).await;
    let n = filters.len();
    split.read_until(&mut ws, "since: 0", |s| s.caught_up.len() == n).await;
    assert_eq!(split.caught_up.len(), n, "since: 0: caught_up for every subscription");
    for (index, (filter, want)) in filters.iter().zip(&expected).enumerate() {
        let subscription = split.subscription(index).to_owned();
        assert_eq!(split.events_of(index), want, "seed {seed}: since 0 {filter}");
        assert_eq!(
            split.caught_up[&subscription],
            (want.len(), head),
            "seed {seed}: since 0 {filter}: caught_up after the catch-up, at the head"
        );
        assert_eq!(split.subscribed[&(index as u64)].1, head);
    }
    split.check_bodies("since: 0", &log);
    eprintln!("since: 0: {} events came in more than one frame", split.sent_twice().len());

    eprintln!("since: 0 checked at {:?}", started.elapsed());

    // (d) The history API with the same filter as query parameters, page by page.
    let pages: Vec<(String, Vec<u64>, usize)> = filters
        .iter()
        .map(|filter| {
            let want = picked(&as_query_reads(filter), &log);
            // Small pages for small results: each page is a query over the log.
            let limit = [37, 250, 1000][rng.random_range(0..3)];
            let limit = if want.len() / limit > 8 { 1000 } else { limit };
            (query(filter), want, limit)
        })
        .collect();
    let got: Vec<Vec<u64>> = futures_util::stream::iter(&pages)
        .map(|(query, _, limit)| history_api(&server, query, *limit))
        .buffered(4)
        .collect()
        .await;
    for ((query, want, limit), got) in pages.iter().zip(got) {
        assert_eq!(&got, want, "seed {seed}: GET /api/events?{query} (limit {limit})");
    }

    eprintln!("GET /api/events checked at {:?}", started.elapsed());

    // (e) Replay of all time at speed 100.
    for ((filter, want), (got, total, sent)) in
        filters.iter().zip(&expected).zip(replay_all(&server, &filters, &log).await)
    {
        assert_eq!(&got, want, "seed {seed}: replay {filter}");
        assert_eq!((total, sent), (want.len() as u64, want.len() as u64), "replay {filter}");
    }

    eprintln!("replays checked at {:?}", started.elapsed());

    // (c) `history: N` on a fresh connection: the last N matching, then caught_up.
    let sizes = history_sizes(&mut rng, &expected);
    let (mut ws, mut split) =
        subscribe_all(&server, &filters, |index| json!({"history": sizes[index]})).await;
    split.read_until(&mut ws, "history: N", |s| s.caught_up.len() == n).await;
    assert_eq!(
        split.caught_up.len(),
        n,
        "history: N: caught_up for only {} of {n} subscriptions (is history: N implemented?)",
        split.caught_up.len()
    );
    for (index, (filter, all)) in filters.iter().zip(&expected).enumerate() {
        let subscription = split.subscription(index).to_owned();
        let want = &all[all.len().saturating_sub(sizes[index])..];
        let history = sizes[index];
        assert_eq!(split.events_of(index), want, "seed {seed}: history {history} {filter}");
        assert_eq!(
            split.caught_up[&subscription],
            (want.len(), head),
            "seed {seed}: history {history} {filter}: caught_up after them, at the head"
        );
    }
    split.check_bodies("history: N", &log);
    eprintln!("history: N: {} events came in more than one frame", split.sent_twice().len());
    server.stop().await;
    eprintln!("done in {:?}", started.elapsed());
}

/// What one `history: 50` subscription received, checked against the log: the 50 matching
/// events up to `subscribed.last_id`, `caught_up` at that id, then every later one once.
fn check_history_hand_off(what: &str, split: &Split, filter: &Value, log: &[Value]) {
    let (subscription, last_id) = split.subscribed[&0].clone();
    let matching = picked(filter, log);
    let (before, after): (Vec<u64>, Vec<u64>) = matching.iter().partition(|id| **id <= last_id);
    let history = &before[before.len().saturating_sub(50)..];
    assert_eq!(history.len(), 50, "{what}: the test needs 50 matching events before it subscribes");
    assert!(after.len() >= 20, "{what}: the test needs matching events after it subscribed");
    let (at, caught_up) = *split.caught_up.get(&subscription).unwrap_or_else(|| {
        panic!("{what}: no caught_up (is history implemented?)");
    });
    let events = split.events.get(&subscription).map_or(&[][..], Vec::as_slice);
    assert_eq!(caught_up, last_id, "{what}: caught_up.last_id is subscribed.last_id");
    assert_eq!(&events[..at], history, "{what}: the last 50 before caught_up");
    assert_eq!(events[at..], after, "{what}: every later one once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_hands_off_to_live_while_writes_go_on() {
    let seed = seed("history_hands_off_to_live_while_writes_go_on");
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    db.client().await.batch_execute(&Workload::seed_sql()).await.expect("seed");
    let filter =
        json!({"type": ["instance.*", "query.routed"], "where": [["cpu_millis", "gte", 1000]]});

    let stop = CancellationToken::new();
    let writer = {
        let (url, stop, addr) = (db.url.clone(), stop.clone(), server.addr);
        tokio::spawn(async move {
            let client = connect(&url).await;
            let mut workload = Workload::new(seed);
            let mut rounds = 0;
            while !stop.is_cancelled() {
                if rounds % 5 == 4 {
                    let body = workload.app_events().to_string();
                    let (status, reply) = post(addr, "/api/events", None, body.as_bytes()).await;
                    assert_eq!(status, 201, "{body}: {reply}");
                } else {
                    client.batch_execute(&workload.transaction()).await.expect("write");
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            rounds
        })
    };
    // Enough before the subscriptions for 50 matching ones.
    server.wait_for_id(1000, WAIT).await;

    let readers = CancellationToken::new();
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    ws.send(json!({"action": "subscribe", "filter": filter, "history": 50, "ref": 0})).await;
    let by_message = keep_reading(ws, Split::default(), readers.clone(), Duration::ZERO);
    // The query form, once: the first subscription made at connect.
    let url = server.ws_url(&format!("{}&history=50", query(&filter)));
    let (mut ws, _) = Ws::connect_welcomed(&url).await;
    let subscribed = ws.frame().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let mut split = Split::default();
    split.subscribed.insert(
        0,
        (
            subscribed["subscription_id"].as_str().expect("id").to_owned(),
            subscribed["last_id"].as_u64().expect("last_id"),
        ),
    );
    let by_url = keep_reading(ws, split, readers.clone(), Duration::ZERO);

    // Writes go on well past both subscriptions.
    let last_id = subscribed["last_id"].as_u64().expect("last_id");
    server.wait_for_id(last_id + 500, WAIT).await;
    stop.cancel();
    let rounds = writer.await.expect("writer");
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;
    eprintln!("seed {seed}: {rounds} writes, {} events", log.len());
    readers.cancel();
    let want = picked(&filter, &log);
    for (what, reader) in [("history: 50", by_message), ("?history=50", by_url)] {
        let (mut ws, mut split) = reader.await.expect("reader");
        let subscription = split.subscribed[&0].0.clone();
        let done = |s: &Split| {
            s.events.get(&subscription).and_then(|e| e.last()) == want.last()
                && s.caught_up.contains_key(&subscription)
        };
        split.read_until(&mut ws, what, done).await;
        check_history_hand_off(&format!("seed {seed}: {what}"), &split, &filter, &log);
    }

    // `history` excludes `since`, and asks for at most 1000.
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    for extra in [json!({"since": 0, "history": 5}), json!({"history": 1001})] {
        let mut request = json!({"action": "subscribe", "filter": filter, "ref": "bad"});
        request.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        ws.send(request.clone()).await;
        let reply = ws.frame().await;
        assert_eq!(
            (&reply["type"], &reply["code"]),
            (&json!("error"), &json!("bad_request")),
            "{request}: {reply}"
        );
    }
    server.stop().await;
}
