//! Replay over WebSocket (SPEC §5): historic events by time range, paced, several at once.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::client::Ws;
use crate::support::{Running, TestDb};

const EVER: (&str, &str) = ("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z");

/// Frames up to and including `replay_finished` or `replay_stopped` of `replay`.
async fn until_done(ws: &mut Ws, replay: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = ws.frame().await;
        let done = frame["replay_id"] == replay
            && (frame["type"] == "replay_finished" || frame["type"] == "replay_stopped");
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_play_back_in_order_paced_and_side_by_side() {
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let client = db.client().await;
    // Three organizations 300 ms apart, then agents.
    for org in ["a", "b", "c"] {
        client
            .execute("INSERT INTO organizations (id, name) VALUES ($1, 'o')", &[&org])
            .await
            .expect("org");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    client
        .batch_execute("INSERT INTO agents (id, organization_id, name) SELECT 'g' || i, 'a', 'x' FROM generate_series(1, 250) i")
        .await
        .expect("agents");
    let log = db.settled_events().await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;

    // One replay of the organizations at speed 3: their 600 ms of spacing takes at least 200 ms.
    let started = Instant::now();
    ws.send(json!({"action": "replay", "filter": {"type": "organization.*"}, "from": EVER.0, "to": EVER.1, "speed": 3, "ref": "x"}))
        .await;
    let frames = until_done(&mut ws, "r1").await;
    let elapsed = started.elapsed();
    assert_eq!(
        frames[0],
        json!({"type": "replay_started", "replay_id": "r1", "total": 3, "ref": "x"})
    );
    let events: Vec<&Value> =
        frames.iter().filter(|f| f["type"] == "organization.created").collect();
    assert_eq!(events.len(), 3);
    for (event, original) in events.iter().zip(&log) {
        let mut expected = original.clone();
        expected["replay_id"] = json!("r1");
        assert_eq!(**event, expected, "a replayed event is the envelope plus replay_id");
    }
    assert!(elapsed >= Duration::from_millis(180), "spacing kept: {elapsed:?}");
    let last = &frames[frames.len() - 2];
    assert_eq!(last, &json!({"type": "replay_progress", "replay_id": "r1", "sent": 3, "total": 3}));

    // Two at once, with different filters, at full speed.
    for filter in [json!({"type": "agent.*"}), json!({"organization_id": "b"})] {
        ws.send(json!({"action": "replay", "filter": filter, "from": EVER.0, "to": EVER.1, "speed": 100})).await;
    }
    let mut by_replay: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut finished = 0;
    while finished < 2 {
        let frame = ws.frame().await;
        if frame["type"] == "replay_finished" {
            finished += 1;
        } else if frame["type"].as_str().is_some_and(|t| t.contains('.')) {
            let replay = frame["replay_id"].as_str().expect("tagged").to_owned();
            by_replay.entry(replay).or_default().push(frame["id"].as_u64().expect("id"));
        }
    }
    let agents: Vec<u64> = log
        .iter()
        .filter(|e| e["type"] == "agent.created")
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(by_replay["r2"], agents);
    assert_eq!(by_replay["r3"], [2]);

    // A time range: nothing before the first event.
    let first = log[0]["timestamp"].as_str().expect("timestamp");
    ws.send(json!({"action": "replay", "from": EVER.0, "to": first})).await;
    let frames = until_done(&mut ws, "r4").await;
    assert_eq!(frames[0]["total"], 0);
    assert_eq!(frames.last().expect("finished")["sent"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_replay_stops_it_and_bad_requests_are_refused() {
    let db = TestDb::migrated().await;
    let server = Running::start(db.settings()).await;
    let client = db.client().await;
    for org in ["a", "b", "c", "d"] {
        client
            .execute("INSERT INTO organizations (id, name) VALUES ($1, 'o')", &[&org])
            .await
            .expect("org");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.settled_events().await;
    let (mut ws, _) = Ws::connect_welcomed(&server.ws_url("")).await;
    // Very slow: each 200 ms gap becomes the 3 s cap.
    ws.send(json!({"action": "replay", "from": EVER.0, "to": EVER.1, "speed": 0.01})).await;
    assert_eq!(ws.frame().await["type"], "replay_started");
    assert_eq!(ws.frame().await["replay_id"], "r1");
    ws.send(json!({"action": "stop_replay", "replay_id": "r1", "ref": 5})).await;
    assert_eq!(ws.frame().await, json!({"type": "replay_stopped", "replay_id": "r1", "ref": 5}));
    let after = ws.drain().await;
    assert!(
        after.iter().all(|f| f["replay_id"].is_null()),
        "nothing of r1 after it stopped: {after:?}"
    );

    for (bad, code) in [
        (json!({"action": "replay", "from": EVER.0, "to": EVER.1, "speed": 0}), "bad_request"),
        (json!({"action": "replay", "from": EVER.0, "to": EVER.1, "speed": 101}), "bad_request"),
        (json!({"action": "replay", "from": EVER.1, "to": EVER.0}), "bad_request"),
        (json!({"action": "replay", "from": "yesterday", "to": EVER.1}), "bad_request"),
        (json!({"action": "replay", "to": EVER.1}), "bad_request"),
        (
            json!({"action": "replay", "from": EVER.0, "to": EVER.1, "filter": {"type": 3}}),
            "bad_request",
        ),
        (json!({"action": "stop_replay", "replay_id": "r9"}), "not_found"),
        (json!({"action": "stop_replay"}), "bad_request"),
    ] {
        ws.send(bad.clone()).await;
        let reply = ws.frame().await;
        assert_eq!(reply["code"], code, "{bad}: {reply}");
    }
    server.stop().await;
}
