//! SPEC §10 with a real NATS (throwaway servers, `support::nats`), a real Postgres and real
//! clients: a publisher puts every appended event on the stream in id order with the event id
//! as message id; gateways serve clients from it with §5's guarantees; a standby publisher
//! takes over within 5 s of a `kill -9`; a gateway started late serves `since` and `history`
//! from the log; gaps in the stream are filled from the log, and without NATS at all a gateway
//! still delivers, from the log; trigger capture publishes the same way; a stream that is not
//! ours stops the process instead of being retried.

use std::time::Duration;

use rowcast::config::Role;
use serde_json::{Value, json};

use crate::support::client::{Incoming, Ws, get, is_event, post};
use crate::support::nats::{Process, cluster, nats_settings, settings, stream_ids};
use crate::support::{Running, TestDb};

const WAIT: Duration = Duration::from_secs(60);

/// One agent insert per transaction, `n` of them, numbered from `from`: one event each.
async fn insert_agents(db: &TestDb, from: usize, n: usize) {
    let client = db.client().await;
    for i in from..from + n {
        client
            .batch_execute(&format!(
                "INSERT INTO agents (id, organization_id, name, status, model)
                 VALUES ('a{i}', 'acme', 'agent {i}', 'active', 'gpt-4')"
            ))
            .await
            .expect("insert");
    }
}

async fn seeded() -> TestDb {
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('acme', 'Acme')")
        .await
        .expect("seed");
    db
}

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["id"].as_u64().expect("id")).collect()
}

/// Reads event frames from `ws` until one has id `last` (or beyond); returns their ids in
/// arrival order, and every non-event frame's type.
async fn read_through(ws: &mut Ws, last: u64) -> (Vec<u64>, Vec<String>) {
    let (mut events, mut others) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while events.last().is_none_or(|id| *id < last) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_within(left).await {
            Some(Incoming::Frame(frame)) if is_event(&frame) => {
                events.push(frame["id"].as_u64().expect("id"))
            }
            Some(Incoming::Frame(frame)) => {
                others.push(frame["type"].as_str().unwrap_or_default().to_owned())
            }
            other => panic!("waiting for event {last} after {events:?}: {other:?}"),
        }
    }
    (events, others)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_gateway_clients_through_the_stream() {
    let nats = cluster(1);
    let db = seeded().await;
    let publisher = Running::start(settings(&db, Role::Publisher, &nats)).await;
    let gateway = Running::gateway(settings(&db, Role::Gateway, &nats)).await;
    // A publisher serves no WebSocket clients: its bus is not fed.
    assert_eq!(crate::support::client::get_status(publisher.addr, "/ws/events").await, Some(404));

    let (mut ws, _) = Ws::connect_welcomed(&gateway.ws_url("")).await;
    let (_, last_id) = ws.subscribe(json!({}), None).await;
    insert_agents(&db, 0, 30).await;
    let body = json!({"events": [{"type": "cache.miss", "organization_id": "acme", "data": {"ok": true}}]});
    let (status, reply) =
        post(publisher.addr, "/api/events", None, body.to_string().as_bytes()).await;
    assert_eq!(status, 201, "{reply}");
    let log = db.settled_events().await;
    let expected: Vec<u64> = ids(&log).into_iter().filter(|id| *id > last_id).collect();
    assert_eq!(expected.len(), 31, "30 row events and one application event");
    let (received, others) = read_through(&mut ws, *expected.last().expect("events")).await;
    assert_eq!(received, expected, "every event after last_id, once, in order");
    assert!(others.is_empty(), "{others:?}");

    // The stream holds every appended event once, in id order, message id = event id.
    let stream = stream_ids(&nats_settings(&nats)).await;
    assert_eq!(stream, ids(&log), "the stream, by message id");

    let (_, stats) = get(gateway.addr, "/api/events/stats").await;
    assert_eq!(stats["role"], "gateway", "{stats}");
    assert_eq!(stats["state"], "consuming", "{stats}");
    assert_eq!(stats["last_event_id"], json!(log.len()), "{stats}");
    assert!(stats["nats"]["received"].as_u64() >= Some(31), "{stats}");
    assert_eq!(stats["nats"]["stream_pending"], 0, "{stats}");
    let (_, stats) = get(publisher.addr, "/api/events/stats").await;
    assert_eq!((&stats["role"], &stats["state"]), (&json!("publisher"), &json!("streaming")));
    assert_eq!(stats["nats"]["last_published_id"], json!(log.len()), "{stats}");
    let (_, metrics) = get(gateway.addr, "/metrics").await;
    let metrics = metrics.as_str().expect("text").to_owned();
    for line in ["rowcast_role_info{role=\"gateway\"} 1", "rowcast_nats_stream_pending_messages 0"]
    {
        assert!(metrics.lines().any(|l| l == line), "{line:?} in\n{metrics}");
    }
    assert!(metrics.contains("rowcast_nats_stream_lag_seconds "), "{metrics}");

    gateway.stop().await;
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_publisher_takes_over_within_five_seconds() {
    let nats = cluster(1);
    let db = seeded().await;
    let urls = nats.url_list();
    let mut active = Process::serve(&db, Role::Publisher, &urls, &[]);
    crate::support::wait_until_ready(&db, active.addr).await;
    active.until_state("streaming", WAIT).await;
    let standby = Process::serve(&db, Role::Publisher, &urls, &[]);
    standby.wait_ready(WAIT).await;
    standby.until_state("standby", WAIT).await;
    let gateway = Running::gateway(settings(&db, Role::Gateway, &nats)).await;
    let (mut ws, _) = Ws::connect_welcomed(&gateway.ws_url("")).await;
    let (_, last_id) = ws.subscribe(json!({"type": "agent.*"}), None).await;

    insert_agents(&db, 0, 20).await;
    let writing = tokio::spawn({
        let url = db.url.clone();
        async move {
            // Commits go on through the takeover: capture picks them up from the slot.
            let client = crate::support::connect(&url).await;
            for i in 20..120 {
                client
                    .batch_execute(&format!(
                        "INSERT INTO agents (id, organization_id, name, status, model)
                         VALUES ('a{i}', 'acme', 'agent {i}', 'active', 'gpt-4')"
                    ))
                    .await
                    .expect("insert");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    active.kill();
    let takeover = standby.until_state("streaming", Duration::from_secs(30)).await;
    eprintln!("standby publisher took over {} ms after kill -9", takeover.as_millis());
    assert!(takeover < Duration::from_secs(5), "takeover took {takeover:?}");
    writing.await.expect("writer");

    let log = db.settled_events().await;
    assert_eq!(log.len(), 120);
    let expected: Vec<u64> = ids(&log).into_iter().filter(|id| *id > last_id).collect();
    let (received, _) = read_through(&mut ws, *expected.last().expect("events")).await;
    assert_eq!(received, expected, "through the takeover: every event once, in order");
    let stream = stream_ids(&nats_settings(&nats)).await;
    assert_eq!(stream, ids(&log), "the stream holds every id once, in order");
    gateway.stop().await;
    drop(standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_gateway_serves_since_and_history_from_the_log() {
    let nats = cluster(1);
    let db = seeded().await;
    let publisher = Running::start(settings(&db, Role::Publisher, &nats)).await;
    insert_agents(&db, 0, 40).await;
    let before = db.settled_events().await;
    assert_eq!(before.len(), 40);

    let gateway = Running::gateway(settings(&db, Role::Gateway, &nats)).await;
    let (mut ws, welcome) = Ws::connect_welcomed(&gateway.ws_url("")).await;
    assert_eq!(welcome, 40, "a gateway starts at the log's head");
    // `since: 10`: 11..=40 from the log, `caught_up`, then live.
    let (from_ten, _) = ws.subscribe(json!({"type": "agent.created"}), Some(10)).await;
    let frames = ws.through("caught_up").await;
    assert_eq!(frames.last().map(|f| &f["subscription_id"]), Some(&json!(from_ten)));
    let caught_up: Vec<u64> =
        frames.iter().filter(|f| is_event(f)).map(|f| f["id"].as_u64().expect("id")).collect();
    assert_eq!(caught_up, (11..=40).collect::<Vec<u64>>());
    // `history: 5`: the last five, `caught_up`, then live.
    ws.send(json!({"action": "subscribe", "filter": {"type": "agent.*"}, "history": 5})).await;
    let frames = ws.through("caught_up").await;
    let history: Vec<u64> =
        frames.iter().filter(|f| is_event(f)).map(|f| f["id"].as_u64().expect("id")).collect();
    assert_eq!(history, (36..=40).collect::<Vec<u64>>(), "{frames:?}");
    // The REST history reads the log too.
    let (status, page) = get(gateway.addr, "/api/events?type=agent.created&limit=3").await;
    assert_eq!(status, 200, "{page}");

    insert_agents(&db, 40, 5).await;
    let log = db.settled_events().await;
    let mut live = Vec::new();
    while live.len() < 5 {
        let frame = ws.frame().await;
        if is_event(&frame) {
            live.push((frame["id"].as_u64().expect("id"), frame["subscription_ids"].clone()));
        }
    }
    // Each new event once, tagged with both subscriptions.
    let live_ids: Vec<u64> = live.iter().map(|(id, _)| *id).collect();
    assert_eq!(live_ids, &ids(&log)[40..], "live after both hand-offs");
    assert!(live.iter().all(|(_, subs)| subs.as_array().is_some_and(|s| s.len() == 2)));
    assert!(ws.drain().await.iter().all(|f| !is_event(f)), "nothing twice");
    gateway.stop().await;
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_the_stream_are_filled_from_the_log() {
    use async_nats::jetstream::message::PublishMessage;
    let nats = cluster(1);
    let db = seeded().await;
    // A publisher whose NATS does not answer: the log fills, the stream does not.
    let mut lost = settings(&db, Role::Publisher, &nats);
    lost.nats.urls = vec![format!("nats://{}", crate::support::free_addr())];
    let publisher = Running::start(lost).await;
    // One gateway fills gaps only when a message shows them; one also asks the log when idle.
    let mut patient = settings(&db, Role::Gateway, &nats);
    patient.nats.idle_check = Duration::from_secs(600);
    let patient = Running::gateway(patient).await;
    let mut eager = settings(&db, Role::Gateway, &nats);
    eager.nats.idle_check = Duration::from_millis(200);
    let eager = Running::gateway(eager).await;
    let (mut on_patient, _) = Ws::connect_welcomed(&patient.ws_url("")).await;
    let (_, from) = on_patient.subscribe(json!({}), None).await;
    let (mut on_eager, _) = Ws::connect_welcomed(&eager.ws_url("")).await;
    on_eager.subscribe(json!({}), None).await;

    insert_agents(&db, 0, 12).await;
    let log = db.settled_events().await;
    let last = ids(&log).last().copied().expect("events");
    // The idle gateway asked the log: every event, in order, without a single message.
    let (received, _) = read_through(&mut on_eager, last).await;
    assert_eq!(received, ids(&log), "from the log alone");

    // A client resuming here from a gateway that is ahead: its cursor is waited for, not reset.
    let (mut resuming, _) = Ws::connect_welcomed(&patient.ws_url("")).await;
    resuming.send(json!({"action": "subscribe", "filter": {}, "since": last})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A malformed message, then the last event: the patient gateway fills the ids before it.
    let client = async_nats::connect(nats.url(0)).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let junk = PublishMessage::build().payload("not an event".into());
    js.send_publish("rowcast.events.acme._.agent.created", junk)
        .await
        .expect("publish")
        .await
        .expect("ack");
    let newest = log.last().expect("last").to_string();
    let message = PublishMessage::build().payload(newest.into()).message_id(last.to_string());
    js.send_publish("rowcast.events.acme._.agent.created", message)
        .await
        .expect("publish")
        .await
        .expect("ack");
    let (received, _) = read_through(&mut on_patient, last).await;
    assert_eq!(received, ids(&log).into_iter().filter(|id| *id > from).collect::<Vec<_>>());
    let frames = resuming.through("caught_up").await;
    assert_eq!(frames[0]["type"], "subscribed", "{frames:?}");
    assert!(frames[0]["last_id"].as_u64() >= Some(last), "{frames:?}");
    assert!(frames.iter().all(|f| f["type"] != "reset" && !is_event(f)), "{frames:?}");
    let (_, stats) = get(patient.addr, "/api/events/stats").await;
    assert_eq!(stats["nats"]["malformed"], 1, "{stats}");
    assert_eq!(stats["nats"]["gaps"], 1, "{stats}");
    assert_eq!(stats["nats"]["gap_events_filled"], json!(last - from - 1), "{stats}");
    // An event delivered already (a late republish): skipped, once the gateway has it.
    let consumed = stats["nats"]["received"].as_u64().expect("received");
    let again = PublishMessage::build().payload(log[2].to_string().into()).message_id("3");
    js.send_publish("rowcast.events.acme._.agent.created", again)
        .await
        .expect("publish")
        .await
        .expect("ack");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, stats) = get(patient.addr, "/api/events/stats").await;
        if stats["nats"]["received"].as_u64() > Some(consumed) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the republish never reached the gateway");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(on_patient.drain().await.iter().all(|f| !is_event(f)), "no duplicate");

    eager.stop().await;
    patient.stop().await;
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_gateway_still_delivers_from_the_log() {
    let mut nats = cluster(1);
    let db = seeded().await;
    let publisher = Running::start(settings(&db, Role::Publisher, &nats)).await;
    let mut quick = settings(&db, Role::Gateway, &nats);
    quick.nats.idle_check = Duration::from_millis(200);
    let gateway = Running::gateway(quick).await;
    let (mut ws, _) = Ws::connect_welcomed(&gateway.ws_url("")).await;
    let (_, from) = ws.subscribe(json!({}), None).await;

    nats.kill(0);
    insert_agents(&db, 0, 5).await;
    let log = db.settled_events().await;
    let (received, _) = read_through(&mut ws, ids(&log).last().copied().expect("events")).await;
    assert_eq!(received, ids(&log).into_iter().filter(|id| *id > from).collect::<Vec<_>>());
    let (_, stats) = get(gateway.addr, "/api/events/stats").await;
    assert_eq!(stats["nats"]["connected"], false, "{stats}");
    // Degraded, not down: it still delivers every event.
    assert_eq!(crate::support::client::get_status(gateway.addr, "/readyz").await, Some(200));

    // NATS back: the publisher publishes what it missed, the gateway consumes again.
    let nats = tokio::task::spawn_blocking(move || {
        nats.restart(0).expect("restart NATS");
        nats
    })
    .await
    .expect("restart");
    insert_agents(&db, 5, 5).await;
    let log = db.settled_events().await;
    let (received, _) = read_through(&mut ws, ids(&log).last().copied().expect("events")).await;
    assert_eq!(received, ids(&log)[5..].to_vec(), "after NATS came back");
    // The relay published the backlog: the stream has every id, once, in order.
    let deadline = tokio::time::Instant::now() + WAIT;
    while stream_ids(&nats_settings(&nats)).await != ids(&log) {
        assert!(tokio::time::Instant::now() < deadline, "the stream never got the backlog");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gateway.stop().await;
    publisher.stop().await;
}

#[tokio::test]
async fn a_stream_that_is_not_ours_is_a_definite_error() {
    use async_nats::jetstream::stream;
    use rowcast::nats::{NatsError, context, ensure_stream};
    let nats = cluster(1);
    let client = async_nats::connect(nats.url(0)).await.expect("connect");
    let js = context(client);
    let mut settings = nats_settings(&nats);
    // Someone else's stream on our subjects.
    let theirs = stream::Config {
        name: "THEIRS".into(),
        subjects: vec!["rowcast.events.>".into()],
        ..Default::default()
    };
    js.create_stream(theirs).await.expect("their stream");
    let err = ensure_stream(&js, &settings).await.expect_err("overlap");
    assert!(matches!(err, NatsError::Overlap { .. }) && !err.is_retryable(), "{err}");
    assert!(err.to_string().contains("--nats-subject-prefix"), "{err}");
    // Our name, their subjects.
    settings.stream = "THEIRS".into();
    settings.subject_prefix = "other".into();
    let err = ensure_stream(&js, &settings).await.expect_err("subjects");
    assert!(matches!(err, NatsError::Subjects { .. }) && !err.is_retryable(), "{err}");
    // Ours, as configured.
    settings.stream = "OURS".into();
    let mut ours = ensure_stream(&js, &settings).await.expect("created");
    assert_eq!(ours.info().await.expect("info").config.subjects, vec!["other.>".to_owned()]);
    assert_eq!(rowcast::nats::last_id(&mut ours).await.expect("last id"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_capture_publisher_feeds_gateways_too() {
    let nats = cluster(1);
    let db = seeded().await;
    let mut capture = settings(&db, Role::Publisher, &nats);
    capture.source = rowcast::config::SourceMode::Triggers;
    capture.poll_interval = Duration::from_millis(100);
    let publisher = Running::start(capture).await;
    let gateway = Running::gateway(settings(&db, Role::Gateway, &nats)).await;
    let (mut ws, _) = Ws::connect_welcomed(&gateway.ws_url("")).await;
    let (_, from) = ws.subscribe(json!({"type": "agent.*"}), None).await;
    insert_agents(&db, 0, 10).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let log = loop {
        let log = db.events().await;
        if log.len() >= 10 {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "the triggers never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (received, _) = read_through(&mut ws, ids(&log).last().copied().expect("events")).await;
    assert_eq!(received, ids(&log).into_iter().filter(|id| *id > from).collect::<Vec<_>>());
    assert_eq!(stream_ids(&nats_settings(&nats)).await, ids(&log));
    gateway.stop().await;
    publisher.stop().await;
}
