//! The bus through its public methods: indexed matching against brute force, the catch-up
//! hand-off, and connections that fall behind.

use proptest::prelude::*;
use serde_json::json;

use super::buffer::CATCH_UP_BUFFER;
use super::*;
use crate::model::Severity;

fn event(
    id: u64,
    kind: &str,
    org: Option<&str>,
    domain: Option<&str>,
    severity: Severity,
) -> StoredEvent {
    with_data(id, kind, org, domain, severity, "null")
}

fn with_data(
    id: u64,
    kind: &str,
    org: Option<&str>,
    domain: Option<&str>,
    severity: Severity,
    data: &str,
) -> StoredEvent {
    StoredEvent {
        id,
        event_type: kind.into(),
        organization_id: org.map(String::from),
        domain_id: domain.map(String::from),
        severity,
        timestamp: Timestamp(0),
        json: format!(r#"{{"id":{id},"data":{data}}}"#).into(),
    }
}

/// Rows for `where`: the same numbers spelled differently, numbers beside numeric strings,
/// missing and null values, a nested key.
const DATA: [&str; 9] = [
    r#"{"status":"a","n":1}"#,
    r#"{"status":"b","n":1.0}"#,
    r#"{"status":"a","n":"1"}"#,
    r#"{"status":"c","n":10e-1}"#,
    r#"{"n":0}"#,
    r#"{"status":null,"n":-0.0}"#,
    r#"{"status":true,"n":2,"m":{"k":"a"}}"#,
    r#"{"status":["a"],"n":[1]}"#,
    "null",
];
const PREDICATES: [&str; 9] = [
    r#"["status","eq","a"]"#,
    r#"["status","in",["a","b",true]]"#,
    r#"["n","eq",1]"#,
    r#"["n","in",[0,"1"]]"#,
    r#"["n","eq",1e0]"#,
    r#"["m.k","eq","a"]"#,
    r#"["status","neq","a"]"#,
    r#"["n","gte",1]"#,
    r#"["old.n","eq",1]"#,
];

/// `(event id, subscription numbers)` of every event frame queued.
fn delivered(outbound: &Outbound) -> Vec<(u64, Vec<u32>)> {
    outbound
        .queued()
        .into_iter()
        .filter_map(|frame| match frame {
            Frame::Event { id, subscriptions, .. } => Some((id, subscriptions.to_vec())),
            Frame::Control(_)
            | Frame::Replay { .. }
            | Frame::CatchingUp { .. }
            | Frame::Live { .. }
            | Frame::Notice(_) => None,
        })
        .collect()
}

const KINDS: [&str; 6] = [
    "agent.created",
    "agent.deleted",
    "user.created",
    "user.deleted",
    "deployment.failed",
    "organization.updated",
];
const ORGS: [Option<&str>; 4] = [Some("quant"), Some("acme"), Some(""), None];
const DOMAINS: [Option<&str>; 3] = [Some("demo"), Some("prod"), None];
const PATTERNS: [&str; 7] =
    ["*", "agent.*", "*.deleted", "user.created", "deployment.failed", "user.*", "*.created"];

fn filter_strategy() -> impl Strategy<Value = Filter> {
    let types = prop::option::of(prop::collection::vec(prop::sample::select(&PATTERNS[..]), 1..3));
    let orgs = prop::option::of(prop::collection::vec(
        prop::sample::select(&["quant", "acme", ""][..]),
        1..3,
    ));
    let domains =
        prop::option::of(prop::collection::vec(prop::sample::select(&["demo", "prod"][..]), 1..2));
    let severity = prop::sample::select(&["info", "warning", "error"][..]);
    let predicates = prop::collection::vec(prop::sample::select(&PREDICATES[..]), 0..3);
    (types, orgs, domains, severity, predicates).prop_map(
        |(types, orgs, domains, severity, predicates)| {
            let predicates: Vec<serde_json::Value> = predicates
                .iter()
                .map(|text| serde_json::from_str(text).expect("predicate"))
                .collect();
            let filter = json!({"type": types, "organization_id": orgs, "domain_id": domains,
                "severity": severity, "where": predicates});
            Filter::from_json(Some(&filter)).expect("generated filters are valid")
        },
    )
}

proptest! {
    /// The index never changes the outcome: each connection gets one frame per event that
    /// matches any of its subscriptions, listing exactly those, as brute force says.
    #[test]
    fn indexed_matching_equals_brute_force(
        connections in prop::collection::vec(prop::collection::vec(filter_strategy(), 0..4), 1..6),
        events in prop::collection::vec((0..KINDS.len(), 0..ORGS.len(), 0..DOMAINS.len(), 0..3u8, 0..DATA.len()), 1..40),
        unsubscribe in prop::collection::vec(any::<bool>(), 0..24),
    ) {
        let bus = Bus::new(0, Arc::default());
        let mut registered = Vec::new();
        let mut flags = unsubscribe.into_iter();
        for filters in connections {
            let outbound = Outbound::new(usize::MAX);
            let (connection, _) = bus.connect(outbound.clone());
            let mut live = Vec::new();
            for (number, filter) in filters.into_iter().enumerate() {
                let number = number as u32 + 1;
                let filter = Arc::new(filter);
                bus.subscribe(connection, number, filter.clone(), None, |_| String::new()).expect("open");
                if flags.next().unwrap_or(false) {
                    prop_assert!(bus.unsubscribe(connection, number));
                } else {
                    live.push((number, filter));
                }
            }
            registered.push((outbound, live));
        }
        let stored: Vec<StoredEvent> = events
            .iter()
            .enumerate()
            .map(|(i, &(k, o, d, s, data))| {
                let severity = [Severity::Info, Severity::Warning, Severity::Error][s as usize];
                with_data(i as u64 + 1, KINDS[k], ORGS[o], DOMAINS[d], severity, DATA[data])
            })
            .collect();
        bus.publish(&stored);
        prop_assert_eq!(bus.head(), stored.len() as u64);
        for (outbound, live) in &registered {
            let expected: Vec<(u64, Vec<u32>)> = stored
                .iter()
                .filter_map(|e| {
                    let envelope = Envelope::new(&e.json);
                    let subject = e.subject(&envelope);
                    let numbers: Vec<u32> =
                        live.iter().filter(|(_, f)| f.matches(&subject)).map(|(n, _)| *n).collect();
                    (!numbers.is_empty()).then_some((e.id, numbers))
                })
                .collect();
            prop_assert_eq!(delivered(outbound), expected);
        }
    }
}

#[test]
fn a_catch_up_hands_off_through_its_buffer() {
    let bus = Bus::new(10, Arc::default());
    let outbound = Outbound::new(usize::MAX);
    let (connection, head) = bus.connect(outbound.clone());
    assert_eq!(head, 10);
    let (live, catching) = (Arc::new(Filter::all()), Arc::new(Filter::all()));
    bus.subscribe(connection, 1, live, None, |_| String::new()).expect("open");
    assert_eq!(bus.subscribe(connection, 2, catching, Some(3), |h| format!("at {h}")), Ok(10));
    let agent = |id| event(id, "agent.created", None, None, Severity::Info);
    bus.publish(&[agent(11), agent(12)]);
    // Live frames name only the live subscription; the catching-up one buffers them.
    assert_eq!(delivered(&outbound), [(11, vec![1]), (12, vec![1])]);
    // Its catch-up read the log up to 10 (its `last_id`): the buffer covers the rest.
    assert_eq!(bus.go_live(connection, 2, 10), GoLive::Live);
    assert_eq!(delivered(&outbound)[2..], [(11, vec![2]), (12, vec![2])]);
    bus.publish(&[agent(13)]);
    assert_eq!(delivered(&outbound)[4..], [(13, vec![1, 2])]);
    assert_eq!(bus.go_live(connection, 3, 13), GoLive::Gone);
    let markers: Vec<String> = outbound
        .queued()
        .iter()
        .filter(|f| matches!(f, Frame::CatchingUp { .. } | Frame::Live { .. }))
        .map(|f| format!("{f:?}"))
        .collect();
    assert_eq!(
        markers,
        [
            "CatchingUp { subscription: 2, from: 3, lagging: false }",
            "Live { subscription: 2, caught_up: None }"
        ]
    );
}

#[test]
fn an_overflowing_catch_up_buffer_sends_the_catch_up_back_to_the_log() {
    let bus = Bus::new(0, Arc::default());
    let outbound = Outbound::new(usize::MAX);
    let (connection, _) = bus.connect(outbound.clone());
    bus.subscribe(connection, 1, Arc::new(Filter::all()), Some(0), |_| String::new())
        .expect("open");
    let events: Vec<StoredEvent> = (1..=CATCH_UP_BUFFER as u64 + 1)
        .map(|id| event(id, "agent.created", None, None, Severity::Info))
        .collect();
    bus.publish(&events);
    let head = events.len() as u64;
    assert_eq!(bus.go_live(connection, 1, 0), GoLive::Behind(head));
    bus.publish(&[event(head + 1, "user.created", None, None, Severity::Info)]);
    // Read up to `head` from the log; the new buffer holds the one after.
    assert_eq!(bus.go_live(connection, 1, head), GoLive::Live);
    assert_eq!(delivered(&outbound), [(head + 1, vec![1])]);
}

fn agent(id: u64) -> StoredEvent {
    event(id, "agent.created", Some("quant"), None, Severity::Info)
}

/// Everything queued, markers and controls included, as short strings.
fn stream(outbound: &Outbound) -> Vec<String> {
    outbound
        .queued()
        .into_iter()
        .map(|frame| match frame {
            Frame::Event { id, subscriptions, history, .. } => {
                format!("{}{id} {subscriptions:?}", if history { "h" } else { "" })
            }
            Frame::Control(text) => text,
            Frame::CatchingUp { subscription, from, lagging } => {
                format!("catching_up s{subscription} {from} {lagging}")
            }
            Frame::Live { subscription, caught_up } => {
                format!("live s{subscription} {caught_up:?}")
            }
            Frame::Replay { id, .. } => format!("replay {id}"),
            Frame::Notice(notice) => format!("{notice:?}"),
        })
        .collect()
}

/// A mailbox that holds `frames` event frames like [`agent`]'s, with `subscriptions` ids each.
fn room_for(frames: usize, subscriptions: usize) -> Arc<Outbound> {
    let frame = Frame::Event {
        id: 1,
        envelope: agent(1).json,
        subscriptions: vec![1; subscriptions].into(),
        history: false,
        committed_at: 0,
        text: Some(Bytes::from(mailbox::event_text(&agent(1).json, &vec![1; subscriptions]))),
    };
    Outbound::new(frames * frame.size())
}

#[test]
fn a_full_mailbox_makes_its_connection_lag_and_nobody_else() {
    let bus = Bus::new(0, Arc::default());
    let slow = room_for(2, 2);
    let fast = Outbound::new(usize::MAX);
    let (connection, _) = bus.connect(slow.clone());
    for number in [1, 2] {
        bus.subscribe(connection, number, Arc::new(Filter::all()), None, |_| String::new())
            .expect("open");
    }
    let (other, _) = bus.connect(fast.clone());
    bus.subscribe(other, 1, Arc::new(Filter::all()), None, |_| String::new()).expect("open");
    slow.drain_now();
    fast.drain_now();
    bus.publish(&(1..=5).map(agent).collect::<Vec<_>>());
    assert!(!slow.is_closing(), "falling behind is no reason to close");
    // Two fit; at 3 both subscriptions start catching up from 2, in order, and are told.
    assert_eq!(
        stream(&slow),
        ["1 [1, 2]", "2 [1, 2]", "catching_up s1 2 true", "catching_up s2 2 true"]
    );
    assert_eq!(delivered(&fast).len(), 5, "the others get everything");
    // The mailbox holds its budget and the markers, no more: the rest waits in the buffer.
    let marker = Frame::CatchingUp { subscription: 1, from: 2, lagging: true }.size();
    assert!(slow.bytes() <= slow.budget() + 2 * marker);
    assert!(bus.claim_lag(connection), "the session takes the catch-up on");
    assert!(!bus.claim_lag(connection), "once");
    let lag = bus.lag_members(connection).expect("lagging");
    let members: Vec<(u32, u64)> = {
        let mut members: Vec<_> = lag.members.iter().map(|(s, from, _)| (*s, *from)).collect();
        members.sort_unstable();
        members
    };
    assert_eq!(members, [(1, 2), (2, 2)]);
    assert_eq!(bus.stats().slow_consumer_closes, 0);

    // The writer takes what was queued; the catch-up read nothing from the log (the buffer
    // holds 3..=5) and asks to go live at 2.
    slow.drain_now();
    assert_eq!(bus.lag_go_live(connection, 2, lag.generation), GoLive::Live);
    assert_eq!(
        stream(&slow),
        ["h3 [1, 2]", "h4 [1, 2]", "h5 [1, 2]", "live s1 Some(5)", "live s2 Some(5)"]
    );
    // Live again, one frame per event for both.
    slow.drain_now();
    bus.publish(&[agent(6)]);
    assert_eq!(stream(&slow), ["6 [1, 2]"]);
    assert_eq!(bus.lag_members(connection).map(|l| l.generation), None);
}

#[test]
fn a_lag_whose_buffer_overflows_reads_the_log_and_counts_the_mailbox() {
    let bus = Bus::new(0, Arc::default());
    let slow = room_for(1, 1);
    let (connection, _) = bus.connect(slow.clone());
    bus.subscribe(connection, 1, Arc::new(Filter::all()), None, |_| String::new()).expect("open");
    slow.drain_now();
    // The buffer's bytes count against the mailbox's budget: a few events overflow it.
    bus.publish(&(1..=5).map(agent).collect::<Vec<_>>());
    let generation = bus.lag_members(connection).expect("lagging").generation;
    assert_eq!(bus.lag_go_live(connection, 1, generation), GoLive::Behind(5));
    bus.publish(&[agent(6)]);
    // Read 2..=5 from the log meanwhile: the buffer, started again at 5, holds 6. But the
    // writer has not taken anything yet: wait for room.
    assert!(matches!(bus.lag_go_live(connection, 5, generation), GoLive::Wait(_)));
    slow.drain_now();
    assert_eq!(bus.lag_go_live(connection, 5, generation), GoLive::Live);
    assert_eq!(stream(&slow), ["h6 [1]", "live s1 Some(6)"]);
}

#[test]
fn subscriptions_made_while_lagging_join_the_lag() {
    let bus = Bus::new(0, Arc::default());
    let slow = room_for(1, 1);
    let (connection, _) = bus.connect(slow.clone());
    bus.subscribe(connection, 1, Arc::new(Filter::all()), None, |_| String::new()).expect("open");
    // A `since` subscription that has not caught up yet stays out of it.
    bus.subscribe(connection, 3, Arc::new(Filter::all()), Some(0), |_| String::new())
        .expect("open");
    slow.drain_now();
    bus.publish(&(1..=2).map(agent).collect::<Vec<_>>());
    let before = bus.lag_members(connection).expect("lagging").generation;
    assert_eq!(
        bus.subscribe(connection, 2, Arc::new(Filter::all()), None, |h| format!("at {h}")),
        Ok(2)
    );
    let lag = bus.lag_members(connection).expect("lagging");
    assert_ne!(lag.generation, before, "a catch-up that did not read for s2 cannot end the lag");
    assert_eq!(bus.lag_go_live(connection, 1, before), GoLive::Behind(2));
    let mut members: Vec<(u32, u64)> = lag.members.iter().map(|(s, f, _)| (*s, *f)).collect();
    members.sort_unstable();
    assert_eq!(members, [(1, 1), (2, 2)]);
    // s3's catch-up ends: it joins the lag at the head too, after its buffered events.
    slow.drain_now();
    assert_eq!(bus.go_live(connection, 3, 1), GoLive::Live);
    assert_eq!(stream(&slow), ["h2 [3]", "live s3 None", "catching_up s3 2 true"]);
    assert_eq!(bus.lag_members(connection).map(|l| l.members.len()), Some(3));
    // Unsubscribing every member ends the lag.
    for number in [1, 2, 3] {
        assert!(bus.unsubscribe(connection, number));
    }
    assert!(bus.lag_members(connection).is_none());
}

#[test]
fn a_buffered_event_of_an_unsubscribed_member_is_not_sent() {
    let bus = Bus::new(0, Arc::default());
    let slow = room_for(1, 2);
    let (connection, _) = bus.connect(slow.clone());
    let user = Arc::new(Filter::from_json(Some(&json!({"type": "user.*"}))).expect("filter"));
    bus.subscribe(connection, 1, Arc::new(Filter::all()), None, |_| String::new()).expect("open");
    bus.subscribe(connection, 2, user, None, |_| String::new()).expect("open");
    slow.drain_now();
    let user_created = |id| event(id, "user.created", None, None, Severity::Info);
    bus.publish(&[user_created(1), user_created(2), agent(3)]);
    let generation = bus.lag_members(connection).expect("lagging").generation;
    assert!(bus.unsubscribe(connection, 1));
    slow.drain_now();
    assert_eq!(bus.lag_go_live(connection, 1, generation), GoLive::Live);
    assert_eq!(stream(&slow), ["h2 [2]", "live s2 Some(3)"], "3 matched s1 only");
}
