//! The bus through its public methods: indexed matching against brute force, the catch-up
//! hand-off, and slow consumers.

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::model::Severity;

fn event(
    id: u64,
    kind: &str,
    org: Option<&str>,
    domain: Option<&str>,
    severity: Severity,
) -> StoredEvent {
    StoredEvent {
        id,
        event_type: kind.into(),
        organization_id: org.map(String::from),
        domain_id: domain.map(String::from),
        severity,
        timestamp: Timestamp(0),
        json: format!(r#"{{"id":{id}}}"#).into(),
    }
}

/// `(event id, subscription numbers)` of every event frame queued.
fn delivered(outbound: &Outbound) -> Vec<(u64, Vec<u32>)> {
    outbound
        .queued()
        .into_iter()
        .filter_map(|frame| match frame {
            Frame::Event { id, subscriptions, .. } => Some((id, subscriptions)),
            Frame::Control(_)
            | Frame::Replay { .. }
            | Frame::CatchingUp { .. }
            | Frame::Live { .. } => None,
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
    (types, orgs, domains, severity).prop_map(|(types, orgs, domains, severity)| {
        let filter = json!({"type": types, "organization_id": orgs, "domain_id": domains, "severity": severity});
        Filter::from_json(Some(&filter)).expect("generated filters are valid")
    })
}

proptest! {
    /// The index never changes the outcome: each connection gets one frame per event that
    /// matches any of its subscriptions, listing exactly those, as brute force says.
    #[test]
    fn indexed_matching_equals_brute_force(
        connections in prop::collection::vec(prop::collection::vec(filter_strategy(), 0..4), 1..6),
        events in prop::collection::vec((0..KINDS.len(), 0..ORGS.len(), 0..DOMAINS.len(), 0..3u8), 1..40),
        unsubscribe in prop::collection::vec(any::<bool>(), 0..24),
    ) {
        let bus = Bus::new(0, Arc::default());
        let mut registered = Vec::new();
        let mut flags = unsubscribe.into_iter();
        for filters in connections {
            let outbound = Outbound::new(10_000, usize::MAX);
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
            .map(|(i, &(k, o, d, s))| {
                let severity = [Severity::Info, Severity::Warning, Severity::Error][s as usize];
                event(i as u64 + 1, KINDS[k], ORGS[o], DOMAINS[d], severity)
            })
            .collect();
        bus.publish(&stored);
        prop_assert_eq!(bus.head(), stored.len() as u64);
        for (outbound, live) in &registered {
            let expected: Vec<(u64, Vec<u32>)> = stored
                .iter()
                .filter_map(|e| {
                    let subject = Subject {
                        event_type: &e.event_type,
                        organization_id: e.organization_id.as_deref(),
                        domain_id: e.domain_id.as_deref(),
                        severity: e.severity,
                    };
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
    let outbound = Outbound::new(100, usize::MAX);
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
    assert_eq!(markers, ["CatchingUp { subscription: 2, from: 3 }", "Live { subscription: 2 }"]);
}

#[test]
fn an_overflowing_catch_up_buffer_sends_the_catch_up_back_to_the_log() {
    let bus = Bus::new(0, Arc::default());
    let outbound = Outbound::new(100_000, usize::MAX);
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

#[test]
fn a_full_queue_closes_that_connection_only() {
    let bus = Bus::new(0, Arc::default());
    let slow = Outbound::new(2, usize::MAX);
    let fast = Outbound::new(100, usize::MAX);
    for outbound in [&slow, &fast] {
        let (connection, _) = bus.connect(outbound.clone());
        bus.subscribe(connection, 1, Arc::new(Filter::all()), None, |_| String::new())
            .expect("open");
    }
    let events: Vec<StoredEvent> =
        (1..=5).map(|id| event(id, "agent.created", Some("quant"), None, Severity::Info)).collect();
    bus.publish(&events);
    assert!(slow.is_closing());
    assert_eq!(delivered(&fast).len(), 5);
    let stats = bus.stats();
    assert_eq!((stats.connections, stats.slow_consumer_closes), (1, 1));
}
