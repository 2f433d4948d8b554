//! Replay (SPEC §5): a time window of history, paced, tagged with its replay id.

use serde_json::json;
use tokio::time::Instant;

use super::*;

#[tokio::test(start_paused = true)]
async fn a_replay_sends_its_window_paced_by_speed_then_finishes() {
    // Five agents a second apart (seconds 1 to 5 of 2026) and a user, outside the filter.
    let mut history = agents(1..=5);
    history.push(event(6, "user.created", 6));
    let context = context(ServerSettings::default(), &history);
    let mut client = open(&context);
    client.json().await;
    let start = Instant::now();
    client.send(json!({
        "action": "replay", "filter": {"type": "agent.*"}, "speed": 4, "ref": "go",
        "from": "2026-01-01T00:00:02Z", "to": "2026-01-01T00:01:00Z",
    }));
    assert_eq!(
        client.json().await,
        json!({"type": "replay_started", "replay_id": "r1", "total": 4, "ref": "go"})
    );
    let mut events = Vec::new();
    let progress = loop {
        let frame = client.json().await;
        if !is_event(&frame) {
            break frame;
        }
        assert_eq!(frame["replay_id"], "r1");
        assert!(frame.get("subscription_ids").is_none(), "not a subscription's event");
        events.push(frame["id"].as_u64().expect("id"));
    };
    assert_eq!(events, [2, 3, 4, 5]);
    assert_eq!(
        progress,
        json!({"type": "replay_progress", "replay_id": "r1", "sent": 4, "total": 4})
    );
    assert_eq!(
        client.json().await,
        json!({"type": "replay_finished", "replay_id": "r1", "sent": 4})
    );
    // Three one-second gaps at four times the speed.
    let elapsed = Instant::now() - start;
    assert!(
        elapsed >= Duration::from_millis(750) && elapsed < Duration::from_millis(760),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_replay_frees_its_place_before_it_says_it_finished() {
    let history = agents(1..=3);
    let settings = ServerSettings { max_replays: 1, ..ServerSettings::default() };
    let context = context(settings, &history);
    let mut client = open(&context);
    client.json().await;
    let replay = |reference: u32| {
        json!({"action": "replay", "filter": {}, "speed": 100, "ref": reference,
               "from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:01:00Z"})
    };
    for round in 1..=20u32 {
        client.send(replay(round));
        let started = client.json().await;
        assert_eq!(started["type"], "replay_started", "round {round}: {started}");
        if round == 1 {
            // The one place is taken while it runs.
            client.send(replay(0));
        }
        let mut refused = 0;
        loop {
            let frame = client.json().await;
            match frame["type"].as_str() {
                Some("replay_finished") => break,
                Some("error") => {
                    assert_eq!(frame["code"], "too_many_subscriptions", "{frame}");
                    refused += 1;
                }
                _ => {}
            }
        }
        // Refused while it ran; the next one, started the moment it says it finished, is not.
        assert_eq!(refused, usize::from(round == 1), "round {round}");
    }
}
