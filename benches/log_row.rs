//! The cheapest durable log row (issue 15): appends of the same events, 1,000 per statement,
//! each its own synchronously committed transaction, into tables that differ in one thing:
//! the body's type (`json` as today, `text`, `bytea`), how rows get there (`INSERT ... SELECT
//! unnest(...)` as today, or `COPY ... FROM STDIN (FORMAT binary)` in a transaction), and the
//! index set (with or without `committed_at`'s index).
//!
//! `cargo bench --bench log_row [-- EVENTS]` (default 100000). Prints events/s per variant,
//! each measured twice in alternation on one throwaway cluster.

mod support;

use std::pin::pin;
use std::time::{Instant, SystemTime};

use rowcast::apps::cluster::Cluster;
use support::{arg, client};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

const BATCH: usize = 1_000;

/// An `agent.updated` envelope as the log stores it, about 900 bytes.
fn body(id: usize) -> String {
    format!(
        r#"{{"id":{id},"type":"agent.updated","timestamp":"2026-11-22T10:15:30.123456Z","organization_id":"org{o}","domain_id":"research","severity":"info","data":{{"id":"agt-{id}","organization_id":"org{o}","domain_id":"research","name":"support assistant","status":"active","model":"gpt-5","config":{{"tools":["sql","email"],"temperature":0.2,"max_tokens":1024}},"last_seen_at":"2026-11-22T10:15:30.123456+00:00","created_at":"2026-11-22T10:15:30.123456+00:00","updated_at":"2026-11-22T10:15:30.123456+00:00"}},"old":{{"status":"inactive"}},"changed":["status"],"source":{{"kind":"row","table":"public.agents","op":"update","lsn":"0/16B3748","xid":7301}}}}"#,
        o = id % 100
    )
}

#[derive(Clone, Copy, Debug)]
enum Body {
    Json,
    Text,
    Bytea,
}

#[derive(Clone, Copy, Debug)]
enum Load {
    Unnest,
    CopyBinary,
}

#[derive(Clone, Copy, Debug)]
enum TimeIndex {
    BTree,
    Brin,
    None,
}

struct Variant {
    name: &'static str,
    body: Body,
    load: Load,
    committed_at_index: TimeIndex,
}

const VARIANTS: [Variant; 6] = [
    Variant {
        name: "json, unnest (today)",
        body: Body::Json,
        load: Load::Unnest,
        committed_at_index: TimeIndex::BTree,
    },
    Variant {
        name: "text, unnest",
        body: Body::Text,
        load: Load::Unnest,
        committed_at_index: TimeIndex::BTree,
    },
    Variant {
        name: "bytea, unnest",
        body: Body::Bytea,
        load: Load::Unnest,
        committed_at_index: TimeIndex::BTree,
    },
    Variant {
        name: "text, COPY binary",
        body: Body::Text,
        load: Load::CopyBinary,
        committed_at_index: TimeIndex::BTree,
    },
    Variant {
        name: "text, unnest, BRIN on committed_at",
        body: Body::Text,
        load: Load::Unnest,
        committed_at_index: TimeIndex::Brin,
    },
    Variant {
        name: "text, unnest, no committed_at index",
        body: Body::Text,
        load: Load::Unnest,
        committed_at_index: TimeIndex::None,
    },
];

fn sql_type(body: Body) -> &'static str {
    match body {
        Body::Json => "json",
        Body::Text => "text",
        Body::Bytea => "bytea",
    }
}

async fn create(db: &tokio_postgres::Client, table: &str, variant: &Variant) {
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (id bigint PRIMARY KEY, type text NOT NULL,
             committed_at timestamptz NOT NULL, organization_id text, domain_id text,
             severity smallint NOT NULL, body {} NOT NULL, key text);
         CREATE UNIQUE INDEX ON {table} (key) WHERE key IS NOT NULL;
         {}
         CREATE TABLE IF NOT EXISTS head (source text PRIMARY KEY, last_id bigint NOT NULL);
         INSERT INTO head VALUES ('{table}', 0) ON CONFLICT (source) DO UPDATE SET last_id = 0;",
        sql_type(variant.body),
        match variant.committed_at_index {
            TimeIndex::BTree => format!("CREATE INDEX ON {table} (committed_at);"),
            TimeIndex::Brin => format!("CREATE INDEX ON {table} USING brin (committed_at);"),
            TimeIndex::None => String::new(),
        }
    ))
    .await
    .expect("table");
}

/// Appends `events` in batches; returns events/s.
async fn run(db: &tokio_postgres::Client, table: &str, variant: &Variant, events: usize) -> f64 {
    create(db, table, variant).await;
    db.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let cast = match variant.body {
        Body::Json => "body::json",
        Body::Text => "body",
        Body::Bytea => "convert_to(body, 'UTF8')",
    };
    let insert = db
        .prepare(&format!(
            "WITH appended AS (
                 INSERT INTO {table} (id, type, committed_at, organization_id, domain_id, severity, body)
                 SELECT id, 'agent.updated', $2, organization_id, 'research', 1, {cast}
                   FROM unnest($1::bigint[], $3::text[], $4::text[]) AS e(id, organization_id, body)
                 RETURNING 1
             ), moved AS (UPDATE head SET last_id = $5 WHERE source = '{table}')
             SELECT count(*) FROM appended"
        ))
        .await
        .expect("prepare");
    let now = SystemTime::now();
    let started = Instant::now();
    for first in (1..=events).step_by(BATCH) {
        let ids: Vec<i64> = (first..first + BATCH).map(|i| i as i64).collect();
        let orgs: Vec<String> = (first..first + BATCH).map(|i| format!("org{}", i % 100)).collect();
        let bodies: Vec<String> = (first..first + BATCH).map(body).collect();
        let last = (first + BATCH - 1) as i64;
        match variant.load {
            Load::Unnest => {
                let params: [&(dyn ToSql + Sync); 5] = [&ids, &now, &orgs, &bodies, &last];
                db.query_one(&insert, &params).await.expect("append");
            }
            Load::CopyBinary => {
                db.batch_execute("BEGIN").await.expect("begin");
                let sink = db
                    .copy_in(&format!(
                        "COPY {table} (id, type, committed_at, organization_id, domain_id, severity, body)
                         FROM STDIN (FORMAT binary)"
                    ))
                    .await
                    .expect("copy");
                let types = [
                    Type::INT8,
                    Type::TEXT,
                    Type::TIMESTAMPTZ,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT2,
                    Type::TEXT,
                ];
                let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
                for ((id, org), body) in ids.iter().zip(&orgs).zip(&bodies) {
                    let row: [&(dyn ToSql + Sync); 7] =
                        [id, &"agent.updated", &now, org, &"research", &1i16, body];
                    writer.as_mut().write(&row).await.expect("row");
                }
                writer.finish().await.expect("finish");
                db.execute(
                    &format!("UPDATE head SET last_id = $1 WHERE source = '{table}'"),
                    &[&last],
                )
                .await
                .expect("head");
                db.batch_execute("COMMIT").await.expect("commit");
            }
        }
    }
    events as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let events = arg(1, 100_000).div_ceil(BATCH) * BATCH;
    println!(
        "rowcast log row benchmark: {events} events, {BATCH} per synchronously committed append"
    );
    let cluster = Cluster::start(&[("max_wal_size", "4GB")]).expect("cluster");
    let db = client(&cluster.url("postgres")).await;
    db.batch_execute("SET synchronous_commit = on").await.expect("sync");
    let mut rates = vec![Vec::new(); VARIANTS.len()];
    for _round in 0..2 {
        for (i, variant) in VARIANTS.iter().enumerate() {
            rates[i].push(run(&db, &format!("events_{i}"), variant, events).await);
        }
    }
    let today = rates[0].iter().sum::<f64>() / 2.0;
    for (variant, rates) in VARIANTS.iter().zip(&rates) {
        let mean = rates.iter().sum::<f64>() / 2.0;
        println!(
            "{:<40} {:>8.0} and {:>8.0} events/s ({:+.0} % vs today)",
            variant.name,
            rates[0],
            rates[1],
            (mean / today - 1.0) * 100.0
        );
    }
}
