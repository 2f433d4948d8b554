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

/// The id a 4008 reason names.
pub(super) fn resume_id(reason: &str) -> u64 {
    reason
        .rsplit_once("; last delivered id ")
        .and_then(|(_, id)| id.parse().ok())
        .unwrap_or_else(|| panic!("the reason names no id: {reason:?}"))
}

#[tokio::test(start_paused = true)]
async fn a_socket_that_takes_nothing_is_closed_with_4008_once_the_client_reads_again() {
    let limits = ServerSettings::default();
    let (write_timeout, close_timeout) = (limits.write_timeout, limits.close_timeout);
    let context = context(limits, &[]);
    // A socket that holds one frame the client has not read, then makes the writer wait.
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    commit(&context, &agents(1..=3));
    let start = Instant::now();
    // Nothing is read for longer than the write timeout, but less than it plus the close
    // timeout: the client comes back in time for the close frame.
    tokio::time::sleep(write_timeout + close_timeout / 2).await;
    assert_eq!(context.bus.stats().slow_consumer_closes, 1, "decided at the write timeout");
    let (frames, close) = client.until_close().await;
    let (code, reason) = close.expect("a close frame, with a code");
    assert_eq!(code, 4008);
    assert!(reason.starts_with("slow consumer, nothing read for 30s; "), "{reason}");
    // Everything up to the id it names arrived before it, nothing after: `since` loses nothing.
    let resume = resume_id(&reason);
    assert_eq!(event_ids(&frames), (1..=resume).collect::<Vec<_>>());
    assert!(resume >= 1, "the socket held event 1");
    assert!(Instant::now() - start < write_timeout + close_timeout);
    assert!(!client.closed_without_a_code());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_again_is_dropped_without_a_codeless_close() {
    let limits = ServerSettings::default();
    let (write_timeout, close_timeout) = (limits.write_timeout, limits.close_timeout);
    let context = context(limits, &[]);
    let mut client = connect(&context, Scope::everything(), Ok(None), 1);
    client.json().await;
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["type"], "subscribed");
    let start = Instant::now();
    commit(&context, &agents(1..=3));
    (&mut client.session).await.expect("the session ended");
    let ended = Instant::now() - start;
    assert!(ended >= write_timeout + close_timeout, "{ended:?}");
    assert!(ended < write_timeout + close_timeout + Duration::from_millis(10), "{ended:?}");
    // What the socket held, then its end: no close frame at all rather than one without a code.
    let mut rest = Vec::new();
    while let Ok(message) = client.from_server.try_recv() {
        rest.push(message);
    }
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(matches!(&rest[0], Message::Text(_)), "{rest:?}");
    assert!(!client.closed_without_a_code(), "dropped, not closed without a code");
    assert_eq!(context.bus.stats().connections, 0, "it left the bus");
}
