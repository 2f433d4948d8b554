//! Micro-benchmarks of the pure hot paths: pgoutput decoding, value rendering and filter
//! matching (alone and through the bus's index), and what `where` predicates add to a publish
//! among 10,000 subscriptions. `cargo bench --bench micro`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use rowcast::bus::Bus;
use rowcast::bus::mailbox::Outbound;
use rowcast::capture::pgoutput::{self, Datum, LogicalMessage, Tuple};
use rowcast::capture::render::{self, Category};
use rowcast::filter::{Envelope, Filter, Subject};
use rowcast::log::StoredEvent;
use rowcast::model::{Severity, Timestamp};
use serde_json::{Value, json};

fn agent_row() -> Tuple {
    let text = |s: &str| Datum::Text(Bytes::copy_from_slice(s.as_bytes()));
    Tuple(vec![
        text("agt-000123"),
        text("quant"),
        text("research"),
        text("support assistant"),
        text("active"),
        text("gpt-5"),
        text(r#"{"tools": ["sql", "email"], "temperature": 0.2, "max_tokens": 1024}"#),
        text("2026-11-22 10:15:30.123456+00"),
        text("2026-11-22 10:15:30.123456+00"),
        text("2026-11-22 10:15:30.123456+00"),
    ])
}

fn decode(c: &mut Criterion) {
    let insert = pgoutput::encode(&LogicalMessage::Insert { relation: 16_384, new: agent_row() });
    c.bench_function("pgoutput: decode a 10-column insert", |b| {
        b.iter(|| pgoutput::decode(black_box(insert.clone())).expect("decodes"))
    });
}

fn render_values(c: &mut Criterion) {
    let cases: [(&str, &[u8], Category); 5] = [
        ("text", b"support assistant", Category::Text),
        ("numeric", b"12345.678900", Category::Number),
        ("timestamptz", b"2026-11-22 10:15:30.123456+00", Category::TimestampTz),
        ("jsonb", br#"{"tools": ["sql", "email"], "temperature": 0.2}"#, Category::Jsonb),
        (
            "int[]",
            b"{1,2,3,NULL,5,6,7,8}",
            Category::Array { elem: Box::new(Category::Number), delim: b',' },
        ),
    ];
    let mut group = c.benchmark_group("render");
    for (name, text, kind) in cases {
        group.bench_function(name, |b| b.iter(|| render::render(black_box(text), &kind)));
    }
    group.finish();
}

fn filters(c: &mut Criterion) {
    let filter = Filter::from_json(Some(&json!({
        "type": ["agent.*", "deployment.failed"],
        "organization_id": ["quant", "acme"],
        "severity": "info"
    })))
    .expect("filter");
    let subject = Subject {
        event_type: "agent.status_changed",
        organization_id: Some("quant"),
        domain_id: Some("research"),
        severity: Severity::Info,
        envelope: None,
    };
    c.bench_function("filter: match one event", |b| {
        b.iter(|| black_box(&filter).matches(&subject))
    });

    // The bus with 10,000 subscriptions across 100 organizations: an event meets only its
    // organization's 100 (indexed), whatever the total.
    let bus = Bus::new(0, Default::default());
    let mut outbounds = Vec::new();
    for i in 0..10_000u32 {
        let outbound = Outbound::new(usize::MAX / 2);
        let (connection, _) = bus.connect(outbound.clone());
        let filter = json!({"type": "agent.*", "organization_id": format!("org{}", i % 100)});
        let filter = Arc::new(Filter::from_json(Some(&filter)).expect("filter"));
        bus.subscribe(connection, 1, filter, None, |_| String::new()).expect("subscribe");
        outbounds.push(outbound);
    }
    let event = StoredEvent {
        id: 1,
        event_type: "agent.created".into(),
        organization_id: Some("org7".into()),
        domain_id: None,
        severity: Severity::Info,
        timestamp: Timestamp(0),
        json: r#"{"id":1,"type":"agent.created"}"#.into(),
    };
    let mut id = 0;
    let org7: Vec<&Arc<Outbound>> = outbounds.iter().skip(7).step_by(100).collect();
    c.bench_function("bus: publish one event among 10,000 subscriptions (100 match)", |b| {
        b.iter_custom(|iterations| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iterations {
                id += 1;
                let mut event = event.clone();
                event.id = id;
                let started = std::time::Instant::now();
                bus.publish(std::slice::from_ref(&event));
                spent += started.elapsed();
                // Not timed: the writers' side, so queues do not grow.
                for outbound in &org7 {
                    black_box(outbound.drain_now());
                }
            }
            spent
        })
    });
}

/// An `agent.status_changed` update as the log stores it: the ten columns of `agents` in `data`
/// and `old` (rendered as `to_jsonb` does), `changed` and `source`; about 1 KB.
const AGENT_ENVELOPE: &str = concat!(
    r#"{"id":1,"type":"agent.status_changed","timestamp":"2026-11-22T10:15:30.123456Z","#,
    r#""organization_id":"org7","domain_id":"research","severity":"info","#,
    r#""data":{"id":"agt-000123","organization_id":"org7","domain_id":"research","#,
    r#""name":"support assistant","status":"active","model":"gpt-5","#,
    r#""config":{"tools":["sql","email"],"temperature":0.2,"max_tokens":1024},"#,
    r#""last_seen_at":"2026-11-22T10:15:30.123456+00:00","#,
    r#""created_at":"2026-11-20T08:00:00.000001+00:00","#,
    r#""updated_at":"2026-11-22T10:15:30.123456+00:00"},"#,
    r#""old":{"id":"agt-000123","organization_id":"org7","domain_id":"research","#,
    r#""name":"support assistant","status":"paused","model":"gpt-5","#,
    r#""config":{"tools":["sql","email"],"temperature":0.2,"max_tokens":1024},"#,
    r#""last_seen_at":"2026-11-22T09:58:02.654321+00:00","#,
    r#""created_at":"2026-11-20T08:00:00.000001+00:00","#,
    r#""updated_at":"2026-11-22T09:58:02.654321+00:00"},"#,
    r#""changed":["last_seen_at","status","updated_at"],"#,
    r#""source":{"table":"public.agents","op":"update","lsn":"0/16B3748","xid":7301}}"#
);

fn agent_event() -> StoredEvent {
    StoredEvent {
        id: 1,
        event_type: "agent.status_changed".into(),
        organization_id: Some("org7".into()),
        domain_id: Some("research".into()),
        severity: Severity::Info,
        timestamp: Timestamp(0),
        json: AGENT_ENVELOPE.into(),
    }
}

/// What subscriptions name, the catch-all (`*`) among them.
const TYPES: [&str; 5] =
    ["agent.*", "agent.status_changed", "instance.*", "deployment.failed", "*"];
const STATUSES: [&str; 4] = ["active", "inactive", "paused", "error"];

/// 1–3 `where` predicates, varied by `n`: `status` eq one status (a quarter hold for the
/// event's `active`), `status` in two (half hold), `config.max_tokens` gt 0–1792 (half hold for
/// its 1024), `config.temperature` gt 0.0–0.4 (two in five hold for its 0.2).
fn predicates(n: u32) -> Value {
    let status = |k: u32| STATUSES[(k % 4) as usize];
    let kinds = [
        json!(["status", "eq", status(n / 3)]),
        json!(["status", "in", [status(n / 5), status(n / 5 + 1)]]),
        json!(["config.max_tokens", "gt", 256 * (n / 7 % 8)]),
        json!(["config.temperature", "gt", f64::from(n / 11 % 5) / 10.0]),
    ];
    let count = 1 + n % 3;
    let first = n / 3 % 4;
    (0..count).map(|k| kinds[((first + k) % 4) as usize].clone()).collect()
}

/// 10,000 subscriptions spread over 100 organizations and the `TYPES` (the index keeps an
/// event to its organization's 60 that name its entity or `*`), with `where` predicates or not.
fn spread(with_where: bool) -> impl Iterator<Item = Value> {
    (0..10_000u32).map(move |i| {
        let (organization, n) = (i % 100, i / 100);
        let mut filter = json!({
            "type": TYPES[(n % 5) as usize],
            "organization_id": format!("org{organization}"),
        });
        if with_where {
            filter["where"] = predicates(n);
        }
        filter
    })
}

/// 10,000 subscriptions that all reach the event (its organization, `agent.*` or its exact
/// type): the index prunes nothing and only the predicates differ.
fn all_candidates(with_where: bool) -> impl Iterator<Item = Value> {
    (0..10_000u32).map(move |i| {
        let mut filter = json!({
            "type": if i % 2 == 0 { "agent.*" } else { "agent.status_changed" },
            "organization_id": "org7",
        });
        if with_where {
            filter["where"] = predicates(i);
        }
        filter
    })
}

/// 10,000 dashboards each watching one agent (`agent.*` where `id eq …`), all in the event's
/// organization: only the index on `eq` predicates keeps this from being 10,000 checks.
fn watching_one_agent_each() -> impl Iterator<Item = Value> {
    (0..10_000u32).map(|i| {
        json!({"type": "agent.*", "organization_id": "org7",
               "where": [["id", "eq", format!("agt-{:06}", 123 + i)]]})
    })
}

/// A bus with one connection (one subscription each) per filter, and their mailboxes.
fn bus_with(filters: impl Iterator<Item = Value>) -> (Bus, Vec<Arc<Outbound>>) {
    let bus = Bus::new(0, Default::default());
    let mut outbounds = Vec::new();
    for filter in filters {
        let outbound = Outbound::new(usize::MAX / 2);
        let (connection, _) = bus.connect(outbound.clone());
        let filter = Arc::new(Filter::from_json(Some(&filter)).expect("filter"));
        bus.subscribe(connection, 1, filter, None, |_| String::new()).expect("subscribe");
        outbounds.push(outbound);
    }
    for outbound in &outbounds {
        outbound.drain_now();
    }
    (bus, outbounds)
}

/// Times `Bus::publish` of the agent event (a new id each time); untimed, empties the mailboxes
/// it queued for, so queues do not grow. The name gets the number of frames one publish queues.
fn bench_publish(c: &mut Criterion, name: &str, filters: impl Iterator<Item = Value>) {
    let (bus, outbounds) = bus_with(filters);
    let event = agent_event();
    bus.publish(std::slice::from_ref(&event));
    let matched: Vec<&Arc<Outbound>> = outbounds.iter().filter(|o| !o.is_empty()).collect();
    let mut id = 1;
    let name = format!("{name} ({} match)", matched.len());
    c.bench_function(&name, |b| {
        b.iter_custom(|iterations| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iterations {
                for outbound in &matched {
                    black_box(outbound.drain_now());
                }
                id += 1;
                let mut event = event.clone();
                event.id = id;
                let started = std::time::Instant::now();
                bus.publish(std::slice::from_ref(&event));
                spent += started.elapsed();
            }
            spent
        })
    });
}

/// Issue 14: what `where` predicates add to a publish among 10,000 subscriptions.
fn predicate_publish(c: &mut Criterion) {
    c.bench_function("where: parse the agent envelope", |b| {
        b.iter(|| Envelope::new(black_box(AGENT_ENVELOPE)).value().is_some())
    });
    let filter = Filter::from_json(Some(&json!({"type": "agent.*", "where": [
        ["status", "in", ["active", "paused"]],
        ["config.max_tokens", "gt", 512],
        ["config.temperature", "gt", 0.1],
    ]})))
    .expect("filter");
    let envelope = Envelope::new(AGENT_ENVELOPE);
    let event = agent_event();
    let subject = event.subject(&envelope);
    assert!(filter.matches(&subject));
    c.bench_function("where: match 3 predicates (envelope parsed)", |b| {
        b.iter(|| black_box(&filter).matches(black_box(&subject)))
    });
    bench_publish(c, "bus 10k: indexed, no where", spread(false));
    bench_publish(c, "bus 10k: indexed, 1-3 where each", spread(true));
    bench_publish(c, "bus 10k: all candidates, no where", all_candidates(false));
    bench_publish(c, "bus 10k: all candidates, 1-3 where each", all_candidates(true));
    bench_publish(c, "bus 10k: each watches one agent id", watching_one_agent_each());
}

criterion_group!(benches, decode, render_values, filters, predicate_publish);
criterion_main!(benches);
