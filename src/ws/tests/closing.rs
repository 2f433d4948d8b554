//! How connections end, and the close code each reason gets (SPEC §5, §6, §9).

use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};

use super::*;

#[tokio::test(start_paused = true)]
async fn broken_and_oversized_frames_close_with_their_codes() {
    let context = context(ServerSettings::default(), &[]);
    let cases = [
        (
            WsError::Capacity(CapacityError::MessageTooLong { size: 1 << 20, max_size: 64 << 10 }),
            Some((1009, "frame too large (limit 65536 bytes)")),
        ),
        (WsError::Utf8("invalid utf-8 sequence".into()), Some((1007, "text frame is not UTF-8"))),
        (
            WsError::Protocol(ProtocolError::UnmaskedFrameFromClient),
            Some((1002, "websocket protocol error")),
        ),
        // The socket failed: there is no one to tell.
        (WsError::ConnectionClosed, None),
    ];
    for (error, expected) in cases {
        let mut client = open(&context);
        client.json().await;
        client.send(json!({"action": "ping"}));
        client.send_message(Err(axum::Error::new(error)));
        let (frames, close) = client.until_close().await;
        let expected = expected.map(|(code, reason)| (code, reason.to_owned()));
        assert_eq!(close, expected);
        if close.is_some() {
            assert_eq!(frames, [json!({"type": "pong"})], "what came before is written first");
        }
        client.session.await.expect("the session ended");
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_close_ends_the_session_without_a_close_frame() {
    let context = context(ServerSettings::default(), &[]);
    let mut client = open(&context);
    client.json().await;
    client.send_message(Ok(Message::Close(None)));
    assert_eq!(client.next().await, None);
    client.session.await.expect("the session ended");
    assert_eq!(context.bus.stats().connections, 0, "it left the bus");
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_pinged_then_closed_with_1000() {
    let limits = ServerSettings::default();
    let (idle, ping) = (limits.idle_timeout, limits.ping_interval);
    let context = context(limits, &[]);
    let start = Instant::now();
    let mut client = open(&context);
    client.json().await;
    // A client frame restarts the idle clock; the server's own pings do not.
    tokio::time::sleep(idle / 2).await;
    client.send(json!({"action": "ping"}));
    let mut pings = 0;
    let close = loop {
        match client.next_message().await {
            Some(Message::Ping(_)) => pings += 1,
            Some(Message::Text(text)) => assert_eq!(text.as_str(), r#"{"type":"pong"}"#),
            Some(Message::Close(Some(frame))) => break (frame.code, frame.reason.to_string()),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(close, (1000, "idle timeout".to_owned()));
    let (elapsed, expected) = (Instant::now() - start, idle / 2 + idle);
    // The paused clock still rounds timers to the millisecond.
    assert!(elapsed >= expected && elapsed < expected + Duration::from_millis(10), "{elapsed:?}");
    assert_eq!(pings, expected.as_secs() / ping.as_secs(), "a ping every interval");
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_with_4001() {
    let context = context(ServerSettings::default(), &[]);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let scope = Scope { organizations: None, domains: None, expires_at: Some(now + 30) };
    let mut client = connect(&context, scope, Ok(None), 100);
    client.json().await;
    let start = Instant::now();
    assert_eq!(client.close().await, (4001, "token expired".to_owned()));
    assert!(Instant::now() - start <= Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn shutdown_writes_what_is_queued_then_closes_with_1001() {
    let context = context(ServerSettings::default(), &[]);
    let mut client = open(&context);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    // Queued and closed in one go: the writer has not written any of it yet.
    commit(&context, &agents(1..=3));
    context.bus.close();
    let (frames, close) = client.until_close().await;
    assert_eq!(event_ids(&frames), [1, 2, 3]);
    assert_eq!(close, Some((1001, "server shutting down".into())));
    assert_eq!(client.next().await, None);
    client.session.await.expect("the session ended");
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_closed_with_4008_naming_an_id_to_resume_from() {
    let limits = ServerSettings { outbound_frames: 8, ..ServerSettings::default() };
    let context = context(limits, &[]);
    // A socket that takes one frame the client has not read, then makes the writer wait.
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    commit(&context, &agents(1..=3));
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(client.json().await["id"].as_u64().expect("an event"));
    }
    // The client stops reading: one event fills the socket, the writer waits on the next,
    // and then far more than the queue holds arrive.
    for id in 4..=6 {
        commit(&context, &agents([id]));
        tokio::task::yield_now().await;
    }
    commit(&context, &agents(7..=40));
    let (frames, close) = client.until_close().await;
    received.extend(event_ids(&frames));
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 4008);
    let resume: u64 = reason
        .strip_prefix("slow consumer; last delivered id ")
        .and_then(|id| id.parse().ok())
        .expect("the reason names an id");
    // Everything up to that id was received, nothing after it: `since` loses nothing.
    assert!(resume >= 4, "the socket took event 4 before it filled: {received:?}");
    assert_eq!(received, (1..=resume).collect::<Vec<_>>());
    assert_eq!(context.bus.stats().slow_consumer_closes, 1);
}
