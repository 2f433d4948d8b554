//! Delivery (SPEC §5, §7): real WebSocket and HTTP clients against a real server and Postgres.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::client::{Ending, Incoming, Ws, get, is_event};
use crate::support::{Running, TestDb};

const WAIT: Duration = Duration::from_secs(30);

/// The filter semantics of SPEC §5, written independently of the server's.
pub fn matches(filter: &Value, event: &Value) -> bool {
    let list = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(items) => {
                Some(items.iter().map(|i| i.as_str().expect("str").to_owned()).collect())
            }
            other => panic!("bad test filter {other}"),
        }
    };
    let kind = event["type"].as_str().expect("type");
    let (entity, action) = kind.split_once('.').expect("dot");
    let type_ok = list(&filter["type"]).is_none_or(|patterns| {
        patterns.iter().any(|p| {
            let (e, a) = p.split_once('.').unwrap_or(("*", "*"));
            (e == "*" || e == entity) && (a == "*" || a == action)
        })
    });
    let scope_ok = |field: &str| {
        list(&filter[field]).is_none_or(|allowed| {
            event[field].as_str().is_some_and(|v| allowed.iter().any(|a| a == v))
        })
    };
    let rank =
        |s: &str| ["info", "warning", "error"].iter().position(|x| *x == s).expect("severity");
    let severity_ok = filter["severity"]
        .as_str()
        .is_none_or(|min| rank(event["severity"].as_str().expect("severity")) >= rank(min));
    type_ok && scope_ok("organization_id") && scope_ok("domain_id") && severity_ok
}

fn ids(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter(|f| is_event(f)).map(|f| f["id"].as_u64().expect("id")).collect()
}

/// A workload touching all six entities in two organizations, with null scopes too.
async fn workload(client: &tokio_postgres::Client, round: usize) {
    let r = round;
    let statements = format!(
        "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant'), ('acme', 'Acme') ON CONFLICT DO NOTHING;
         INSERT INTO domains (id, organization_id, name) VALUES ('quant-demo', 'quant', 'Demo'), ('acme-prod', 'acme', 'Prod') ON CONFLICT DO NOTHING;
         INSERT INTO agents (id, organization_id, domain_id, name, status) VALUES ('agt-q{r}', 'quant', 'quant-demo', 'q', 'active'), ('agt-a{r}', 'acme', 'acme-prod', 'a', 'active'), ('agt-n{r}', 'acme', NULL, 'n', 'active');
         UPDATE agents SET status = 'error' WHERE id IN ('agt-q{r}', 'agt-a{r}');
         INSERT INTO instances (id, organization_id, domain_id, agent_id) VALUES ('ins-q{r}', 'quant', 'quant-demo', 'agt-q{r}'), ('ins-a{r}', 'acme', 'acme-prod', 'agt-a{r}');
         UPDATE instances SET status = 'running' WHERE id = 'ins-a{r}';
         INSERT INTO deployments (id, organization_id, domain_id, version) VALUES ('dep-q{r}', 'quant', 'quant-demo', 'v1'), ('dep-a{r}', 'acme', 'acme-prod', 'v1');
         UPDATE deployments SET status = 'running' WHERE id IN ('dep-q{r}', 'dep-a{r}');
         UPDATE deployments SET status = 'failed', error = 'boom' WHERE id = 'dep-q{r}';
         UPDATE deployments SET status = 'completed' WHERE id = 'dep-a{r}';
         INSERT INTO users (id, organization_id, email, name, password_hash) VALUES ('usr-q{r}', 'quant', 'q{r}@example.com', 'Q', 'x'), ('usr-a{r}', 'acme', 'a{r}@example.com', 'A', 'x');
         DELETE FROM users WHERE id = 'usr-a{r}';
         DELETE FROM agents WHERE id = 'agt-n{r}';
         UPDATE organizations SET plan = 'team' WHERE id = 'acme';
         UPDATE domains SET description = 'round {r}' WHERE id = 'quant-demo'"
    );
    for statement in statements.split(';') {
        client.batch_execute(statement).await.expect(statement);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_receive_exactly_their_events() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let filters = [
        json!({"type": "agent.*", "organization_id": "quant"}),
        json!({"type": "*.deleted"}),
        json!({"organization_id": "acme", "domain_id": "acme-prod"}),
        json!({"severity": "error"}),
        json!({"type": ["deployment.failed", "user.created"], "organization_id": ["quant", "acme"]}),
        json!({"type": "*"}),
        json!({"type": ["organization.*", "domain.*", "instance.status_changed"]}),
        json!({"organization_id": "nobody"}),
        json!({"domain_id": ["quant-demo"], "severity": "warning"}),
    ];
    let mut clients = Vec::new();
    for filter in &filters {
        let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
        let (id, _) = ws.subscribe(filter.clone(), None).await;
        clients.push((ws, id));
    }
    let client = db.client().await;
    for round in 0..3 {
        workload(&client, round).await;
    }
    client.batch_execute("TRUNCATE users").await.expect("truncate");
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;
    for (filter, (ws, subscription)) in filters.iter().zip(&mut clients) {
        let frames = ws.drain().await;
        let expected: Vec<u64> = log
            .iter()
            .filter(|e| matches(filter, e))
            .map(|e| e["id"].as_u64().expect("id"))
            .collect();
        assert_eq!(ids(&frames), expected, "filter {filter}");
        for frame in frames.iter().filter(|f| is_event(f)) {
            assert_eq!(frame["subscription_ids"], json!([subscription]), "{frame}");
        }
    }
    // The broad filters did see every entity; the narrow ones saw something.
    let all: BTreeSet<&str> = log
        .iter()
        .map(|e| e["type"].as_str().expect("type").split('.').next().expect("entity"))
        .collect();
    assert_eq!(all.len(), 6, "{all:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frame_per_event_for_all_matching_subscriptions() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    let (agents, _) = ws.subscribe(json!({"type": "agent.*"}), None).await;
    let (quant, _) = ws.subscribe(json!({"organization_id": "quant"}), None).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Q'), ('acme', 'A');
             INSERT INTO agents (id, organization_id, name) VALUES ('a1', 'quant', 'x'), ('a2', 'acme', 'y')",
        )
        .await
        .expect("writes");
    server.wait_for_id(4, WAIT).await;
    let frames = ws.drain().await;
    let seen: Vec<(String, Value)> = frames
        .iter()
        .map(|f| (f["type"].as_str().expect("type").to_owned(), f["subscription_ids"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("organization.created".into(), json!([quant])),
            ("agent.created".into(), json!([agents, quant])),
            ("agent.created".into(), json!([agents])),
        ]
    );
    // Three live frames were written: the latency histogram counted them.
    let (_, metrics) = get(server.addr, "/metrics").await;
    let text = metrics.as_str().expect("text").to_owned();
    assert!(text.contains("rowcast_commit_to_send_seconds_count 3\n"), "{text}");
    // The four captured events passed each stage of the publisher's pipeline once.
    for stage in ["received", "sent_to_log", "appended"] {
        let count = format!("rowcast_pipeline_seconds_count{{stage=\"{stage}\"}} 4\n");
        assert!(text.contains(&count), "{count} in {text}");
    }
    assert!(text.contains("rowcast_events_delivered_total{type=\"agent.created\"} 2\n"), "{text}");
    ws.send(json!({"action": "unsubscribe", "subscription_id": agents, "ref": 7})).await;
    let reply = ws.frame().await;
    assert_eq!(reply, json!({"type": "unsubscribed", "subscription_id": agents, "ref": 7}));
    client
        .batch_execute("INSERT INTO agents (id, organization_id, name) VALUES ('a3', 'acme', 'z'), ('a4', 'quant', 'w')")
        .await
        .expect("writes");
    server.wait_for_id(6, WAIT).await;
    let frames = ws.drain().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["data"]["id"], "a4");
    assert_eq!(frames[0]["subscription_ids"], json!([quant]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_is_gap_free_and_duplicate_free() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q'), ('acme', 'A')")
        .await
        .expect("orgs");
    let filter = json!({"type": ["agent.*"], "organization_id": "quant"});
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    ws.subscribe(filter.clone(), None).await;
    client
        .batch_execute("INSERT INTO agents (id, organization_id, name) SELECT 'q' || i, 'quant', 'x' FROM generate_series(1, 5) i")
        .await
        .expect("agents");
    let last = loop {
        let frame = ws.frame().await;
        if frame["data"]["id"] == "q5" {
            break frame["id"].as_u64().expect("id");
        }
    };
    drop(ws);

    // 500 matching changes while disconnected, with others around them.
    for i in 0..250 {
        client
            .batch_execute(&format!(
                "INSERT INTO agents (id, organization_id, name) VALUES ('b{i}', 'quant', 'x'), ('o{i}', 'acme', 'x');
                 UPDATE agents SET name = 'y' WHERE id = 'b{i}'"
            ))
            .await
            .expect("offline writes");
    }
    // Writes go on while the client reconnects and catches up.
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0..200 {
                let org = if i % 3 == 0 { "acme" } else { "quant" };
                client
                    .batch_execute(&format!("INSERT INTO agents (id, organization_id, name) VALUES ('c{i}', '{org}', 'x')"))
                    .await
                    .expect("online writes");
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let url = server.ws_url(&format!("type=agent.*&organization_id=quant&since={last}"));
    let (mut ws, _) = Ws::connect_welcomed(&url).await;
    let subscribed = ws.frame().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let n = subscribed["last_id"].as_u64().expect("last_id");
    writer.await.expect("writer");
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;
    let mut frames = ws.through("caught_up").await;
    frames.extend(ws.drain().await);

    let caught_up =
        frames.iter().position(|f| f["type"] == "caught_up").expect("caught_up arrives");
    assert_eq!(frames[caught_up]["last_id"], n);
    assert!(frames[..caught_up].iter().all(|f| is_event(f) && f["id"].as_u64() <= Some(n)));
    assert!(frames[caught_up + 1..].iter().all(|f| is_event(f) && f["id"].as_u64() > Some(n)));
    let expected: Vec<u64> = log
        .iter()
        .filter(|e| e["id"].as_u64() > Some(last) && matches(&filter, e))
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    assert!(expected.len() >= 500, "{} matching changes", expected.len());
    assert_eq!(ids(&frames), expected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_after_subscribed_is_always_delivered() {
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q')")
        .await
        .expect("org");
    // Background traffic keeps the bus busy around each subscription.
    let noise = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0.. {
                let sql = format!(
                    "INSERT INTO users (id, organization_id, email, name, password_hash) VALUES ('n{i}', 'quant', 'n{i}@x', 'n', 'x')"
                );
                if client.batch_execute(&sql).await.is_err() {
                    return;
                }
            }
        })
    };
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    for round in 0..25 {
        let (subscription, _) = ws.subscribe(json!({"type": "agent.created"}), None).await;
        client
            .batch_execute(&format!(
                "INSERT INTO agents (id, organization_id, name) VALUES ('r{round}', 'quant', 'x')"
            ))
            .await
            .expect("insert");
        let event = ws.until("agent.created").await;
        assert_eq!(event["data"]["id"], format!("r{round}"));
        assert_eq!(event["subscription_ids"], json!([subscription]));
        ws.send(json!({"action": "unsubscribe", "subscription_id": subscription})).await;
        ws.until("unsubscribed").await;
    }
    noise.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_cursor_gets_reset_then_what_is_left() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('old', 'Old')")
        .await
        .expect("old");
    server.wait_for_id(1, WAIT).await;
    let trimmed = rowcast::log::trim(&client, Duration::ZERO).await.expect("trim");
    assert_eq!(trimmed, 1);
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('new', 'New')")
        .await
        .expect("new");
    server.wait_for_id(2, WAIT).await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("since=0")).await;
    let frames = ws.through("caught_up").await;
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().expect("type")).collect();
    assert_eq!(kinds, ["subscribed", "reset", "organization.created", "caught_up"], "{frames:?}");
    assert_eq!(frames[1]["reason"], "cursor_expired");
    assert_eq!(frames[1]["oldest_id"], 2);
    assert_eq!(frames[2]["id"], 2);
    // A cursor the log never reached.
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("since=99")).await;
    let frames = ws.through("caught_up").await;
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().expect("type")).collect();
    assert_eq!(kinds, ["subscribed", "reset", "caught_up"], "{frames:?}");
    assert_eq!(frames[1]["reason"], "cursor_ahead");
    server.stop().await;
}

/// One transaction of `rows` agents of about 2 KB each: far more than a small socket and a
/// small mailbox hold.
async fn burst(client: &tokio_postgres::Client, tag: &str, rows: usize) {
    client
        .batch_execute(&format!(
            "INSERT INTO agents (id, organization_id, name)
             SELECT '{tag}-' || i, 'quant', repeat('x', 2000) FROM generate_series(1, {rows}) i"
        ))
        .await
        .expect("burst");
}

/// The ids of the events a client receives until it has `last`, read as fast as it can.
/// Stats once `until` holds for them, within `WAIT`; fails saying `what` did not happen.
async fn stats_until(addr: std::net::SocketAddr, what: &str, until: impl Fn(&Value) -> bool) {
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            let (_, stats) = get(addr, "/api/events/stats").await;
            if until(&stats) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{what} did not happen within {WAIT:?}");
}

/// Seeds an organization and commits three 2,000-row transactions (`total` events with the
/// organization's), waiting until the log holds them all. Returns the writing connection.
async fn three_bursts(db: &TestDb, server: &mut Running, total: u64) -> tokio_postgres::Client {
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q')")
        .await
        .expect("org");
    for round in 0..3 {
        burst(&client, &format!("b{round}"), 2000).await;
    }
    server.wait_for_id(total, Duration::from_secs(60)).await;
    client
}

fn read_events(mut ws: Ws, last: u64) -> tokio::task::JoinHandle<(Vec<u64>, Ws)> {
    tokio::spawn(async move {
        let mut ids = Vec::new();
        while ids.last() != Some(&last) {
            let frame = ws.frame().await;
            if is_event(&frame) {
                ids.push(frame["id"].as_u64().expect("id"));
            }
        }
        (ids, ws)
    })
}

/// `lagging` and `caught_up` frames, in order.
fn lag_frames(frames: &[Value]) -> Vec<&str> {
    let kinds = frames.iter().filter_map(|f| f["type"].as_str());
    kinds.filter(|kind| matches!(*kind, "lagging" | "caught_up")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_falls_behind_catches_up_and_loses_nothing() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    // A small mailbox, so that the bursts overflow it well before the default 16 MiB would.
    settings.server.outbound_bytes = 256 << 10;
    let mut server = Running::start(settings).await;
    let mut slow = Ws::connect_small(server.addr, &server.ws_url("type=*"), 4096).await;
    let (mut good, _) = Ws::connect_welcomed(&server.ws_url("type=*")).await;
    for ws in [&mut slow, &mut good] {
        let subscribed = ws.until("subscribed").await;
        assert_eq!(subscribed["last_id"], 0);
    }
    let total = 1 + 3 * 2000;
    let good = read_events(good, total);
    // The slow client reads 50 frames, then pauses, all along.
    let slow = tokio::spawn(async move {
        let mut frames: Vec<Value> = Vec::new();
        let mut events = 0;
        while events < total || lag_frames(&frames).last() == Some(&"lagging") {
            let frame = slow.frame().await;
            events += u64::from(is_event(&frame));
            frames.push(frame);
            if frames.len().is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (frames, slow)
    });
    let client = three_bursts(&db, &mut server, total).await;
    let (received, mut good) = tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .expect("the good client in time")
        .expect("good reader");
    assert_eq!(received, (1..=total).collect::<Vec<u64>>(), "the good client lost nothing");
    let (frames, mut slow) = tokio::time::timeout(Duration::from_secs(120), slow)
        .await
        .expect("the slow client in time")
        .expect("slow reader");
    assert_eq!(ids(&frames), (1..=total).collect::<Vec<u64>>(), "in order, exactly once");
    let lag = lag_frames(&frames);
    assert!(!lag.is_empty(), "it fell behind (else this test proves nothing)");
    assert!(lag.chunks(2).all(|pair| pair == ["lagging", "caught_up"]), "{lag:?}");
    let (_, stats) = get(server.addr, "/api/events/stats").await;
    assert_eq!(stats["slow_consumer_closes"], 0, "{stats}");
    assert_eq!(stats["connections"], 2, "{stats}");
    let (_, metrics) = get(server.addr, "/metrics").await;
    let switches: Option<usize> = metrics.as_str().and_then(|text| {
        text.lines().find_map(|l| l.strip_prefix("rowcast_lagging_switches_total ")?.parse().ok())
    });
    // One per lag of the slow client, and the fast one may have had some on this machine.
    assert!(switches >= Some(lag.len() / 2), "{switches:?} for {lag:?}");
    // Both are live again.
    burst(&client, "after", 1).await;
    for ws in [&mut slow, &mut good] {
        assert_eq!(ws.until("agent.created").await["id"], total + 1);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4008_or_dropped_and_resumes() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    settings.server.outbound_bytes = 256 << 10;
    let write_timeout = Duration::from_secs(1);
    settings.server.write_timeout = write_timeout;
    // Time for a client that stopped reading to come back for its close frame.
    settings.server.close_timeout = Duration::from_secs(5);
    let mut server = Running::start(settings).await;
    let addr = server.addr;
    // Two clients with tiny receive buffers that stop reading: one comes back once the server
    // gave up on it, one never does.
    let mut stopped = Ws::connect_small(addr, &server.ws_url("type=*"), 4096).await;
    let mut gone = Ws::connect_small(addr, &server.ws_url("type=*"), 4096).await;
    let (mut good, _) = Ws::connect_welcomed(&server.ws_url("type=*")).await;
    for ws in [&mut stopped, &mut gone, &mut good] {
        ws.until("subscribed").await;
    }
    let total = 1 + 3 * 2000;
    let good = read_events(good, total);
    three_bursts(&db, &mut server, total).await;
    let (received, _good) = tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .expect("the good client in time")
        .expect("good reader");
    assert_eq!(received, (1..=total).collect::<Vec<u64>>(), "the good client lost nothing");

    // Both sockets took nothing for the write timeout: the server gives up on both.
    stats_until(addr, "the server gives up on both sockets", |s| s["slow_consumer_closes"] == 2)
        .await;
    // One reads again, within the close timeout: what the socket held, then 4008 naming the
    // last id it got.
    let (frames, ending) = stopped.read_to_end(WAIT).await;
    let close = match ending {
        Ending::Closed(Some(close)) => close,
        other => panic!("expected a close frame with a code, got {other:?}"),
    };
    assert_eq!(u16::from(close.code), 4008);
    let reason = close.reason.as_str();
    let resume: u64 = reason
        .strip_prefix(
            format!(
                "slow consumer, nothing read for {}s; last delivered id ",
                write_timeout.as_secs()
            )
            .as_str(),
        )
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("the reason names no id: {reason:?}"));
    assert_eq!(ids(&frames), (1..=resume).collect::<Vec<u64>>(), "everything up to it, no more");
    assert!(resume < total);
    // It resumes from there and gets the rest, exactly once.
    let (mut resumed, _) =
        Ws::connect_welcomed(&server.ws_url(&format!("type=*&since={resume}"))).await;
    let frames = resumed.through("caught_up").await;
    assert_eq!(ids(&frames), (resume + 1..=total).collect::<Vec<u64>>());

    // The other never read again: once the close timeout passed, the server dropped it. It
    // reads what its socket held, then the end: no close frame rather than one without a code.
    stats_until(addr, "the server drops the client that never read", |s| s["connections"] == 2)
        .await;
    let (frames, ending) = gone.read_to_end(WAIT).await;
    let Ending::Aborted(why) = &ending else {
        panic!("expected the connection dropped without a close frame, got {ending:?}");
    };
    eprintln!("the client that never read again saw: {why}");
    let got = ids(&frames);
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<u64>>(), "a prefix, in order");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_frames_and_changes_nothing() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    settings.server.max_frame_bytes = 4096;
    settings.server.max_subscriptions = 3;
    let mut server = Running::start(settings).await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    let cases = [
        ("not json", "bad_request"),
        ("[]", "bad_request"),
        (r#"{"action":"dance","ref":"r1"}"#, "bad_request"),
        (r#"{"action":"subscribe","filter":{"type":5}}"#, "bad_request"),
        (r#"{"action":"subscribe","filter":{"organization_id":[1]}}"#, "bad_request"),
        (r#"{"action":"subscribe","filter":{"type":"agent.*.x"}}"#, "bad_request"),
        (r#"{"action":"subscribe","filter":{"severity":"loud"}}"#, "bad_request"),
        (r#"{"action":"subscribe","since":"yesterday"}"#, "bad_request"),
        (r#"{"action":"unsubscribe","subscription_id":"s99","ref":2}"#, "not_found"),
        (
            r#"{"action":"replay","from":"2026-01-02T00:00:00Z","to":"2026-01-01T00:00:00Z"}"#,
            "bad_request",
        ),
        ("\u{0}\u{ffff}", "bad_request"),
    ];
    for (text, code) in cases {
        ws.send_raw(Message::text(text)).await;
        let reply = ws.frame().await;
        assert_eq!(reply["type"], "error", "{text}: {reply}");
        assert_eq!(reply["code"], code, "{text}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ws.send_raw(Message::text(r#"{"action":"dance","ref":"r1"}"#)).await;
    assert_eq!(ws.frame().await["ref"], "r1");
    ws.send_raw(Message::binary(vec![0xff, 0xfe])).await;
    assert_eq!(ws.frame().await["code"], "bad_request");
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    ws.send_raw(Message::text(deep)).await;
    assert_eq!(ws.frame().await["code"], "bad_request");

    // Limits: subscriptions per connection.
    for _ in 0..3 {
        ws.subscribe(json!({"type": "organization.*"}), None).await;
    }
    ws.send(json!({"action": "subscribe", "filter": {}})).await;
    assert_eq!(ws.frame().await["code"], "too_many_subscriptions");

    // An oversized frame closes that connection with 1009, and only that one.
    let (mut big, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    big.send_raw(Message::text("x".repeat(10_000))).await;
    match big.next_within(WAIT).await {
        Some(Incoming::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }

    // Everything still works.
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q')")
        .await
        .expect("org");
    server.wait_for_id(1, WAIT).await;
    let frames = ws.drain().await;
    assert_eq!(ids(&frames), [1]);
    assert_eq!(frames[0]["subscription_ids"], json!(["s1", "s2", "s3"]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_metadata_stats_and_health_over_http() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let addr = server.addr;
    let client = db.client().await;
    workload(&client, 0).await;
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;

    // Paging through one filter returns exactly its events, in order.
    let filter = json!({"type": ["agent.*", "deployment.failed"], "organization_id": "quant"});
    let mut since = 0;
    let mut paged = Vec::new();
    loop {
        let path = format!(
            "/api/events?type=agent.*,deployment.failed&organization_id=quant&limit=2&since={since}"
        );
        let (status, body) = get(addr, &path).await;
        assert_eq!(status, 200, "{body}");
        let events = body["events"].as_array().expect("events").clone();
        if events.is_empty() {
            assert_eq!(body["next"], since);
            break;
        }
        assert!(events.len() <= 2);
        since = body["next"].as_u64().expect("next");
        assert_eq!(events.last().expect("last")["id"], since);
        paged.extend(events);
    }
    let expected: Vec<&Value> = log.iter().filter(|e| matches(&filter, e)).collect();
    assert_eq!(ids(&paged), ids(&expected.iter().map(|e| (*e).clone()).collect::<Vec<_>>()));
    assert_eq!(paged.iter().collect::<Vec<_>>(), expected);

    // A time range: everything committed from the first event's timestamp on; nothing before.
    let first = log[0]["timestamp"].as_str().expect("timestamp");
    let (_, body) = get(addr, &format!("/api/events?from={first}&limit=1000")).await;
    assert_eq!(body["events"].as_array().expect("events").len(), log.len());
    let (_, body) = get(addr, &format!("/api/events?to={first}")).await;
    assert_eq!(body["events"], json!([]));
    let (_, body) = get(addr, "/api/events?severity=error").await;
    let errors = body["events"].as_array().expect("events");
    let failed = log.iter().filter(|e| e["type"] == "deployment.failed").count();
    assert!(failed > 0 && errors.len() == failed, "{body}");
    assert!(errors.iter().all(|e| e["type"] == "deployment.failed"));

    for bad in [
        "/api/events?limit=x",
        "/api/events?type=..",
        "/api/events?from=yesterday",
        "/api/events?colour=red",
    ] {
        let (status, body) = get(addr, bad).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["code"], "bad_request", "{bad}: {body}");
    }

    let (status, metadata) = get(addr, "/api/events/metadata").await;
    assert_eq!(status, 200);
    let types: Vec<&str> = metadata["event_types"]
        .as_array()
        .expect("types")
        .iter()
        .map(|t| t["type"].as_str().expect("type"))
        .collect();
    assert!(types.contains(&"agent.status_changed") && types.contains(&"deployment.failed"));
    let failed = metadata["event_types"]
        .as_array()
        .expect("types")
        .iter()
        .find(|t| t["type"] == "deployment.failed");
    assert_eq!(failed.expect("failed")["severity"], "error");
    // Declared application events are listed beside row events, under their entity.
    let declared = metadata["event_types"]
        .as_array()
        .expect("types")
        .iter()
        .find(|t| t["type"] == "deployment.log")
        .expect("deployment.log is declared");
    assert_eq!(
        (&declared["kind"], &declared["severity"], &declared["entity"]),
        (&json!("app"), &json!("debug"), &json!("deployment"))
    );
    assert!(declared["description"].as_str().is_some_and(|d| !d.is_empty()));
    let deployment = metadata["entities"]
        .as_array()
        .expect("entities")
        .iter()
        .find(|e| e["name"] == "deployment")
        .expect("deployment");
    assert!(
        deployment["event_types"].as_array().expect("types").contains(&json!("deployment.log"))
    );
    assert!(deployment["description"].is_string());
    assert_eq!(metadata["organizations"], json!(["acme", "quant"]));
    assert!(
        metadata["domains"]
            .as_array()
            .expect("domains")
            .contains(&json!({"id": "acme-prod", "organization_id": "acme"}))
    );

    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("type=agent.*")).await;
    ws.send(json!({"action": "get_metadata", "ref": "m"})).await;
    ws.until("subscribed").await;
    let reply = ws.frame().await;
    assert_eq!(reply["type"], "metadata");
    assert_eq!(reply["data"], metadata);

    let (status, stats) = get(addr, "/api/events/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["connections"], 1, "{stats}");
    assert_eq!(stats["subscriptions"], 1, "{stats}");
    assert_eq!(stats["events_total"], head, "{stats}");
    assert_eq!(stats["source"], "replication");
    assert_eq!(stats["running"], true);
    assert!(stats["log_size_bytes"].as_u64().is_some_and(|s| s > 0), "{stats}");
    assert!(stats["slot_lag_bytes"].as_i64().is_some(), "{stats}");
    assert_eq!(stats["last_event_time"], log.last().expect("last")["timestamp"]);

    // Metrics: appended per type, delivered to the one subscribed connection, latency counted.
    let (status, metrics) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let text = metrics.as_str().expect("text");
    let appended = log.iter().filter(|e| e["type"] == "agent.created").count();
    assert!(
        text.contains(&format!(
            "rowcast_events_appended_total{{type=\"agent.created\"}} {appended}\n"
        )),
        "{text}"
    );
    assert!(text.contains("rowcast_connections 1\n"), "{text}");
    assert!(text.contains("rowcast_errors_total{kind=\"decode\"} 0\n"), "{text}");
    assert!(text.contains("# TYPE rowcast_commit_to_send_seconds histogram"), "{text}");
    assert!(text.contains("rowcast_source_info{source=\"replication\"} 1"), "{text}");

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, ready) = get(addr, "/readyz").await;
    assert_eq!((status, &ready["ready"]), (200, &json!(true)));
    assert_eq!(get(addr, "/").await.0, 200);
    assert_eq!(get(addr, "/nope").await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_what_was_appended_then_closes_with_1001() {
    let db = TestDb::migrated().await;
    let mut server = Running::start(db.settings()).await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("type=*")).await;
    assert_eq!(ws.frame().await["type"], "subscribed");
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) SELECT 'o' || i, 'x' FROM generate_series(1, 200) i")
        .await
        .expect("orgs");
    server.wait_for_id(200, WAIT).await;
    let stopping = tokio::spawn(server.stop());
    let mut got = Vec::new();
    let close = loop {
        match ws.next_within(WAIT).await.expect("frames then a close") {
            Incoming::Frame(frame) => got.push(frame["id"].as_u64().expect("id")),
            Incoming::Closed(frame) => break frame.expect("a close frame"),
        }
    };
    assert_eq!(got, (1..=200).collect::<Vec<u64>>());
    assert_eq!(u16::from(close.code), 1001);
    stopping.await.expect("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_beside_a_live_subscription_and_an_unsubscribe_during_one() {
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Q');
             INSERT INTO agents (id, organization_id, name) SELECT 'h' || i, 'quant', 'x' FROM generate_series(1, 300) i",
        )
        .await
        .expect("history");
    db.settled_events().await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    let (live, _) = ws.subscribe(json!({"type": "agent.*"}), None).await;
    // Steady writes while the second subscription catches up from the very start.
    let writer = {
        let client = db.client().await;
        tokio::spawn(async move {
            for i in 0..300 {
                let sql = format!(
                    "INSERT INTO agents (id, organization_id, name) VALUES ('w{i}', 'quant', 'x')"
                );
                client.batch_execute(&sql).await.expect("write");
            }
        })
    };
    let (catching, n) = ws.subscribe(json!({"type": "agent.*"}), Some(0)).await;
    // A third one is dropped in the middle of its catch-up.
    let (dropped, _) = ws.subscribe(json!({"type": "*"}), Some(0)).await;
    ws.send(json!({"action": "unsubscribe", "subscription_id": dropped})).await;
    writer.await.expect("writer");
    let log = db.settled_events().await;
    let mut frames = Vec::new();
    while !frames
        .iter()
        .any(|f: &Value| f["type"] == "caught_up" && f["subscription_id"] == catching)
    {
        frames.push(ws.frame().await);
    }
    frames.extend(ws.drain().await);

    let for_sub = |subscription: &str| -> Vec<u64> {
        frames
            .iter()
            .filter(|f| {
                is_event(f)
                    && f["subscription_ids"].as_array().expect("ids").contains(&json!(subscription))
            })
            .map(|f| f["id"].as_u64().expect("id"))
            .collect()
    };
    let agents: Vec<u64> = log
        .iter()
        .filter(|e| e["type"] == "agent.created")
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(
        for_sub(&catching),
        agents,
        "the catching-up subscription gets everything once, in order"
    );
    let live_ids = for_sub(&live);
    assert_eq!(live_ids, agents.iter().copied().filter(|id| *id > 301).collect::<Vec<_>>());
    let caught_up =
        frames.iter().position(|f| f["type"] == "caught_up" && f["subscription_id"] == catching);
    assert_eq!(frames[caught_up.expect("caught_up")]["last_id"], n);
    let unsubscribed =
        frames.iter().position(|f| f["type"] == "unsubscribed").expect("unsubscribed");
    let after: Vec<&Value> = frames[unsubscribed..]
        .iter()
        .filter(|f| {
            f["subscription_ids"].as_array().is_some_and(|ids| ids.contains(&json!(dropped)))
                || f["subscription_id"] == dropped
        })
        .collect();
    assert_eq!(after.len(), 1, "nothing for {dropped} after its unsubscribed: {after:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_a_real_servers_events_and_resumes_after_a_restart() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let addr = server.addr;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q')")
        .await
        .expect("org");
    db.settled_events().await;
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["tail", "--url", &format!("ws://{addr}"), "--type", "agent.*", "--since", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tail starts");
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().expect("stdout")).lines();
    let mut next_line = async move || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a line in time");
        serde_json::from_str(&line.expect("read").expect("a line")).expect("a JSON line")
    };
    client
        .batch_execute("INSERT INTO agents (id, organization_id, name) VALUES ('a1', 'quant', 'x')")
        .await
        .expect("a1");
    let first = next_line().await;
    assert_eq!(
        (first["type"].as_str(), first["data"]["id"].as_str()),
        (Some("agent.created"), Some("a1"))
    );
    assert!(first.get("subscription_ids").is_none());

    // The server goes away; changes commit meanwhile; a new server comes up on the same port.
    server.stop().await;
    client
        .batch_execute("INSERT INTO agents (id, organization_id, name) VALUES ('a2', 'quant', 'x')")
        .await
        .expect("a2");
    let mut settings = db.settings();
    settings.server.listen = addr;
    rowcast::setup::setup_replication(&settings).await.expect("setup");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("same port");
    let restarted = rowcast::server::Server::new(settings).await.expect("server");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(restarted.run(listener, shutdown.clone()));
    client
        .batch_execute("INSERT INTO agents (id, organization_id, name) VALUES ('a3', 'quant', 'x')")
        .await
        .expect("a3");
    let ids: Vec<String> = [next_line().await, next_line().await]
        .iter()
        .map(|e| e["data"]["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, ["a2", "a3"], "nothing lost, nothing repeated");
    shutdown.cancel();
    running.await.expect("joined").expect("clean stop");
    let _ = tail.kill().await;
}
