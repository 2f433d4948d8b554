//! Slow consumers (SPEC §5): a client that falls behind catches up from the log and goes live
//! again, exactly once and in order; only one too far behind is closed, with an id to resume
//! from.

use serde_json::json;

use super::closing::resume_id;
use super::*;

/// A mailbox budget of about this many small event frames.
fn budget(frames: usize) -> usize {
    frames * 300
}

/// Events `ids`: agents, with a user every third id; all committed at `second`.
fn mixed(ids: std::ops::RangeInclusive<u64>, second: i64) -> Vec<StoredEvent> {
    ids.map(|id| event(id, if id % 3 == 0 { "user.created" } else { "agent.created" }, second))
        .collect()
}

/// The frames of one subscription's lag, as `(type, last_id)` of its `lagging` and `caught_up`.
fn lag_frames<'a>(frames: &'a [Value], subscription: &str) -> Vec<(&'a str, u64)> {
    frames
        .iter()
        .filter(|f| f["subscription_id"] == subscription)
        .filter_map(|f| Some((f["type"].as_str()?, f["last_id"].as_u64()?)))
        .filter(|(kind, _)| matches!(*kind, "lagging" | "caught_up"))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_client_that_falls_behind_catches_up_from_the_log_and_goes_live_again() {
    let limits = ServerSettings { outbound_bytes: budget(8), ..ServerSettings::default() };
    let context = context(limits, &[]);
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    client.send(json!({"action": "subscribe", "filter": {"type": "agent.*"}}));
    assert_eq!(client.json().await["type"], "subscribed");
    // Bursts of 40 events while the client reads 10 frames after each: far more than its
    // mailbox holds piles up.
    let total = 600;
    let mut frames = Vec::new();
    for first in (1..=total).step_by(40) {
        commit(&context, &mixed(first..=first + 39, 0));
        for _ in 0..10 {
            frames.push(client.json().await);
        }
    }
    // Then it reads everything, until both subscriptions are live again.
    while event_ids(&frames).len() < total as usize
        || ["s1", "s2"]
            .iter()
            .any(|s| lag_frames(&frames, s).last().is_some_and(|f| f.0 != "caught_up"))
    {
        frames.push(client.json().await);
    }
    assert_eq!(event_ids(&frames), (1..=total).collect::<Vec<_>>(), "in order, exactly once");
    for frame in frames.iter().filter(|f| is_event(f)) {
        let expected =
            if frame["type"] == "user.created" { json!(["s1"]) } else { json!(["s1", "s2"]) };
        assert_eq!(frame["subscription_ids"], expected, "one frame for both: {frame}");
    }
    for subscription in ["s1", "s2"] {
        let lag = lag_frames(&frames, subscription);
        assert!(!lag.is_empty(), "{subscription} fell behind");
        let kinds: Vec<&str> = lag.iter().map(|f| f.0).collect();
        assert!(kinds.chunks(2).all(|pair| pair == ["lagging", "caught_up"]), "{kinds:?}");
    }
    // Each `lagging` and `caught_up` names the id up to which everything came before it.
    for (at, frame) in frames.iter().enumerate().filter(|(_, f)| f["last_id"].is_u64()) {
        let last_id = frame["last_id"].as_u64();
        assert!(event_ids(&frames[..at]).iter().all(|id| Some(*id) <= last_id), "{frame}");
        assert!(event_ids(&frames[at..]).iter().all(|id| Some(*id) > last_id), "{frame}");
    }
    assert_eq!(context.bus.stats().slow_consumer_closes, 0, "never closed");
    commit(&context, &mixed(total + 1..=total + 1, 0));
    assert_eq!(client.json().await["id"], total + 1, "live");
    assert!(context.bus.lag_members(1).is_none());
}

#[tokio::test(start_paused = true)]
async fn unsubscribing_a_member_of_a_lag_stops_its_frames_and_not_the_others() {
    let limits = ServerSettings { outbound_bytes: budget(8), ..ServerSettings::default() };
    let context = context(limits, &[]);
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    client.send(json!({"action": "subscribe", "filter": {"type": "agent.*"}}));
    assert_eq!(client.json().await["type"], "subscribed");
    // The lag's catch-up reads for both members and sends what the mailbox takes, then waits
    // for the writer, which waits for the client.
    commit(&context, &mixed(1..=200, 0));
    tokio::time::sleep(Duration::from_millis(1)).await;
    client.send(json!({"action": "unsubscribe", "subscription_id": "s1"}));
    let mut frames = Vec::new();
    loop {
        let frame = client.json().await;
        let done = frame["type"] == "caught_up";
        frames.push(frame);
        if done {
            break;
        }
    }
    let unsubscribed =
        frames.iter().position(|f| f["type"] == "unsubscribed").expect("unsubscribed");
    assert!(
        frames[unsubscribed..]
            .iter()
            .all(|f| !is_event(f) || f["subscription_ids"] == json!(["s2"])),
        "nothing names s1 after its unsubscribed"
    );
    let agents: Vec<u64> = (1..=200).filter(|id| id % 3 != 0).collect();
    let s2: Vec<u64> = frames
        .iter()
        .filter(|f| {
            is_event(f)
                && f["subscription_ids"].as_array().is_some_and(|s| s.contains(&json!("s2")))
        })
        .filter_map(|f| f["id"].as_u64())
        .collect();
    assert_eq!(s2, agents, "s2 lost and repeated nothing");
}

#[tokio::test(start_paused = true)]
async fn a_client_too_far_behind_is_closed_with_4008_and_resumes_from_the_named_id() {
    let limits = ServerSettings { outbound_bytes: budget(8), ..ServerSettings::default() };
    let max_lag = limits.max_lag;
    let context = context(limits, &[]);
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    // A burst committed at 0 s, which the client reads a little of.
    commit(&context, &mixed(1..=100, 0));
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(client.json().await);
    }
    // Events keep coming for longer than `max_lag` (of commit time), and the client is still
    // reading what was committed at 0 s.
    let later = max_lag.as_secs() as i64 + 1;
    commit(&context, &mixed(101..=110, later));
    let (rest, close) = client.until_close().await;
    frames.extend(rest);
    let (code, reason) = close.expect("a close frame, with a code");
    assert_eq!(code, 4008);
    assert!(reason.starts_with("slow consumer, more than 5m behind; "), "{reason}");
    let resume = resume_id(&reason);
    assert_eq!(event_ids(&frames), (1..=resume).collect::<Vec<_>>(), "everything up to it");
    assert!(resume < 100, "closed while catching up: {resume}");
    assert!(!client.closed_without_a_code());
    assert_eq!(context.bus.stats().slow_consumer_closes, 1);

    // Resuming from that id gets the rest, exactly once.
    let initial = Ok(Some((Filter::all(), Start::Since(resume))));
    let mut resumed = connect(&context, Scope::everything(), initial, 100_000);
    resumed.json().await;
    assert_eq!(resumed.json().await["type"], "subscribed");
    let mut rest = Vec::new();
    loop {
        let frame = resumed.json().await;
        if frame["type"] == "caught_up" {
            break;
        }
        rest.push(frame);
    }
    assert_eq!(event_ids(&rest), (resume + 1..=110).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_lag_hands_off_once_its_buffered_events_fit_the_mailbox() {
    // Small bursts, read a little of each: the lag's buffer holds what was published while the
    // catch-up read, and the hand-off has to wait for the writer to make room for it. (A wait
    // that ended before the room was there would spin here, and hang this test.)
    let limits = ServerSettings { outbound_bytes: budget(8), ..ServerSettings::default() };
    let context = context(limits, &[]);
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    let total = 200;
    let mut frames = Vec::new();
    for first in (1..=total).step_by(10) {
        commit(&context, &mixed(first..=first + 9, 0));
        for _ in 0..2 {
            frames.push(client.json().await);
        }
    }
    while event_ids(&frames).len() < total as usize
        || lag_frames(&frames, "s1").last().is_some_and(|f| f.0 != "caught_up")
    {
        frames.push(client.json().await);
    }
    assert_eq!(event_ids(&frames), (1..=total).collect::<Vec<_>>());
    let kinds: Vec<&str> = lag_frames(&frames, "s1").iter().map(|f| f.0).collect();
    assert!(!kinds.is_empty(), "it fell behind");
    assert!(kinds.chunks(2).all(|pair| pair == ["lagging", "caught_up"]), "{kinds:?}");
}
