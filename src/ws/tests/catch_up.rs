//! `since` (SPEC §5): history first, then `caught_up`, then live, with no gap and no duplicate.

use serde_json::json;

use super::*;

/// Frames up to and including the one `done` accepts.
async fn frames_until(client: &mut Client, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = client.json().await;
        let last = done(&frame);
        frames.push(frame);
        if last {
            return frames;
        }
    }
}

/// Checks the order a catch-up promises: events `first..=last_id` (history), `caught_up`
/// naming `last_id`, then events up to `end`, each once, for subscription s1.
fn assert_handed_off(frames: &[Value], first: u64, last_id: u64, end: u64) {
    let caught_up =
        frames.iter().position(|f| f["type"] == "caught_up").expect("a caught_up frame");
    assert_eq!(
        frames[caught_up],
        json!({"type": "caught_up", "subscription_id": "s1", "last_id": last_id})
    );
    assert_eq!(event_ids(&frames[..caught_up]), (first..=last_id).collect::<Vec<_>>(), "history");
    assert_eq!(event_ids(&frames[caught_up..]), (last_id + 1..=end).collect::<Vec<_>>(), "live");
    assert!(frames.iter().filter(|f| is_event(f)).all(|f| f["subscription_ids"] == json!(["s1"])));
    assert_eq!(
        frames.iter().filter(|f| !is_event(f)).count(),
        1,
        "nothing but events and caught_up"
    );
}

#[tokio::test(start_paused = true)]
async fn since_sends_history_then_caught_up_then_live_with_no_gap_or_duplicate() {
    // More than two catch-up pages of history.
    let context = context(ServerSettings::default(), &agents(1..=1200));
    let mut client = open(&context);
    client.json().await;
    // The log is slow: events are published while the catch-up waits for its first page.
    let slow = context.history.gate.write().await;
    client.send(json!({"action": "subscribe", "since": 0}));
    assert_eq!(client.json().await["last_id"], 1200);
    commit(&context, &agents(1201..=1210));
    drop(slow);
    let mut frames = frames_until(&mut client, |f| f["type"] == "caught_up").await;
    commit(&context, &agents(1211..=1215));
    frames.extend(frames_until(&mut client, |f| f["id"] == 1215).await);
    assert_handed_off(&frames, 1, 1200, 1215);
}

#[tokio::test(start_paused = true)]
async fn a_catch_up_overtaken_by_the_bus_reads_the_rest_from_the_log() {
    let context = context(ServerSettings::default(), &agents(1..=10));
    let mut client = open(&context);
    client.json().await;
    let slow = context.history.gate.write().await;
    client.send(json!({"action": "subscribe", "since": 4}));
    assert_eq!(client.json().await["last_id"], 10);
    // More than the bus buffers for a catching-up subscription (4096): it must go back to
    // the log for them.
    commit(&context, &agents(11..=5010));
    drop(slow);
    let frames = frames_until(&mut client, |f| f["id"] == 5010).await;
    assert_handed_off(&frames, 5, 10, 5010);
    commit(&context, &agents([5011]));
    assert_eq!(client.json().await["id"], 5011, "live after all");
}

#[tokio::test(start_paused = true)]
async fn cursors_outside_the_log_get_a_reset() {
    let context = context(ServerSettings::default(), &agents(1..=10));
    context.history.trim_before(5);
    let mut client = open(&context);
    client.json().await;

    client.send(json!({"action": "subscribe", "since": 2}));
    assert_eq!(client.json().await["type"], "subscribed");
    let frames = frames_until(&mut client, |f| f["type"] == "caught_up").await;
    assert_eq!(
        frames[0],
        json!({"type": "reset", "subscription_id": "s1", "reason": "cursor_expired", "oldest_id": 5})
    );
    assert_eq!(event_ids(&frames), [5, 6, 7, 8, 9, 10], "what retention kept");

    client.send(json!({"action": "subscribe", "since": 99}));
    assert_eq!(client.json().await["type"], "subscribed");
    let frames = frames_until(&mut client, |f| f["type"] == "caught_up").await;
    assert_eq!(
        frames,
        [
            json!({"type": "reset", "subscription_id": "s2", "reason": "cursor_ahead", "oldest_id": 11}),
            json!({"type": "caught_up", "subscription_id": "s2", "last_id": 10}),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_of_a_catch_up_follows_its_unsubscribed() {
    let context = context(ServerSettings::default(), &agents(1..=10));
    let mut client = open(&context);
    client.json().await;
    let slow = context.history.gate.write().await;
    client.send(json!({"action": "subscribe", "since": 0}));
    assert_eq!(client.json().await["type"], "subscribed");
    client.send(json!({"action": "unsubscribe", "subscription_id": "s1"}));
    assert_eq!(client.json().await["type"], "unsubscribed");
    drop(slow);
    commit(&context, &agents([11]));
    assert_eq!(client.sync("after").await, [] as [Value; 0]);
}

/// Events 1..=n alternating `agent.created` (odd ids) and `deployment.created` (even ids).
fn mixed(ids: std::ops::RangeInclusive<u64>) -> Vec<StoredEvent> {
    let kind = |id: u64| if id % 2 == 1 { "agent.created" } else { "deployment.created" };
    ids.map(|id| event(id, kind(id), id as i64)).collect()
}

#[tokio::test(start_paused = true)]
async fn history_sends_the_last_n_matches_then_caught_up_then_live() {
    let context = context(ServerSettings::default(), &mixed(1..=40));
    let mut client = open(&context);
    client.json().await;
    let slow = context.history.gate.write().await;
    let filter = json!({"type": "agent.*"});
    client.send(json!({"action": "subscribe", "filter": filter, "history": 5}));
    assert_eq!(client.json().await["last_id"], 40);
    // Published while the start of the history is being looked for: live, not history.
    commit(&context, &mixed(41..=44));
    drop(slow);
    let frames = frames_until(&mut client, |f| f["type"] == "caught_up").await;
    assert_eq!(event_ids(&frames), [31, 33, 35, 37, 39], "the last five agent events");
    assert_eq!(
        frames.last(),
        Some(&json!({"type": "caught_up", "subscription_id": "s1", "last_id": 40}))
    );
    assert_eq!(client.json().await["id"], 41);
    assert_eq!(client.json().await["id"], 43);
    commit(&context, &mixed(45..=45));
    assert_eq!(client.json().await["id"], 45, "then live");
}

#[tokio::test(start_paused = true)]
async fn history_longer_than_the_log_or_matching_nothing_sends_what_there_is() {
    let context = context(ServerSettings::default(), &mixed(1..=6));
    let mut client = open(&context);
    client.json().await;
    client
        .send(json!({"action": "subscribe", "filter": {"type": "deployment.*"}, "history": 1000}));
    assert_eq!(client.json().await["type"], "subscribed");
    let frames = frames_until(&mut client, |f| f["type"] == "caught_up").await;
    assert_eq!(event_ids(&frames), [2, 4, 6]);

    client.send(json!({"action": "subscribe", "filter": {"type": "user.*"}, "history": 3}));
    assert_eq!(client.json().await["type"], "subscribed");
    assert_eq!(
        client.json().await,
        json!({"type": "caught_up", "subscription_id": "s2", "last_id": 6})
    );
    client.send(json!({"action": "subscribe", "since": 1, "history": 3, "ref": "both"}));
    let refused = client.json().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("bad_request"), Some("both"))
    );
}
