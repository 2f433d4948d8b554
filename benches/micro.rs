//! Micro-benchmarks of the pure hot paths: pgoutput decoding, value rendering and filter
//! matching (alone and through the bus's index). `cargo bench --bench micro`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use rowcast::bus::Bus;
use rowcast::bus::mailbox::Outbound;
use rowcast::capture::pgoutput::{self, Datum, LogicalMessage, Tuple};
use rowcast::capture::render::{self, Category};
use rowcast::filter::{Filter, Subject};
use rowcast::log::StoredEvent;
use rowcast::model::{Severity, Timestamp};
use serde_json::json;

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

criterion_group!(benches, decode, render_values, filters);
criterion_main!(benches);
