//! Client actions and their replies (SPEC §5): bad input is answered, never fatal.

use serde_json::json;

use super::*;
use crate::ws::protocol::ProtocolError;

#[tokio::test(start_paused = true)]
async fn subscribe_names_the_head_and_unsubscribe_stops_delivery() {
    let context = context(ServerSettings::default(), &agents(1..=7));
    let mut client = open(&context);
    assert_eq!(
        client.json().await,
        json!({"type": "welcome", "connection_id": "c1", "last_id": 7})
    );

    client.send(json!({"action": "subscribe", "filter": {"type": "agent.*"}, "ref": 1}));
    let subscribed = client.json().await;
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "subscription_id": "s1", "filter": {"type": ["agent.*"]}, "last_id": 7, "ref": 1})
    );
    commit(&context, &[event(8, "agent.created", 8), event(9, "user.created", 9)]);
    let frames = client.sync("a").await;
    assert_eq!(frames, [json!({"id": 8, "type": "agent.created", "subscription_ids": ["s1"]})]);

    client.send(json!({"action": "unsubscribe", "subscription_id": "s1", "ref": "u"}));
    assert_eq!(
        client.json().await,
        json!({"type": "unsubscribed", "subscription_id": "s1", "ref": "u"})
    );
    commit(&context, &agents([10]));
    assert_eq!(client.sync("b").await, [] as [Value; 0], "nothing after unsubscribed");

    for unknown in ["s1", "s99", "bogus"] {
        client.send(json!({"action": "unsubscribe", "subscription_id": unknown, "ref": unknown}));
        let reply = client.json().await;
        assert_eq!(
            (reply["code"].as_str(), reply["ref"].as_str()),
            (Some("not_found"), Some(unknown))
        );
    }
    client.send(json!({"action": "stop_replay", "replay_id": "r1"}));
    assert_eq!(client.json().await["code"], "not_found");
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_bad_request_with_its_ref_and_the_connection_stays_open() {
    let context = context(ServerSettings::default(), &[]);
    let mut client = open(&context);
    client.json().await;

    client.send_message(Ok(Message::Text("not json".into())));
    let reply = client.json().await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    assert!(reply.get("ref").is_none(), "no ref can be read from it");
    let refused = [
        json!({"action": "dance", "ref": "x"}),
        json!({"action": "subscribe", "filter": {"type": 5}, "ref": {"n": 1}}),
        json!({"action": "subscribe", "since": -1, "ref": 3}),
        json!({"action": "ping", "extra": true, "ref": null}),
    ];
    for frame in refused {
        client.send(frame.clone());
        let reply = client.json().await;
        assert_eq!(reply["code"], "bad_request", "{frame}");
        assert_eq!(reply["ref"], frame["ref"], "{frame}");
    }
    client.send_message(Ok(Message::Binary(vec![1, 2, 3].into())));
    assert_eq!(client.json().await["code"], "bad_request");

    client.send(json!({"action": "ping", "ref": [1, "two"]}));
    assert_eq!(client.json().await, json!({"type": "pong", "ref": [1, "two"]}));
    client.send(json!({"action": "get_metadata", "ref": "m"}));
    assert_eq!(
        client.json().await,
        json!({"type": "metadata", "data": {"entities": []}, "ref": "m"})
    );
    client.send(json!({"action": "auth", "token": "anything goes with --auth none"}));
    assert_eq!(client.json().await, json!({"type": "authenticated", "expires_at": null}));
    assert!(!client.session.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_connection_holds_at_most_max_subscriptions() {
    let limits = ServerSettings { max_subscriptions: 2, ..ServerSettings::default() };
    let context = context(limits, &[]);
    let mut client = open(&context);
    client.json().await;
    for _ in 0..2 {
        client.send(json!({"action": "subscribe"}));
        assert_eq!(client.json().await["type"], "subscribed");
    }
    client.send(json!({"action": "subscribe", "ref": "third"}));
    let reply = client.json().await;
    assert_eq!(reply["code"], "too_many_subscriptions");
    assert_eq!(reply["ref"], "third");

    client.send(json!({"action": "unsubscribe", "subscription_id": "s1"}));
    assert_eq!(client.json().await["type"], "unsubscribed");
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["subscription_id"], "s3", "ids are not reused");
}

#[tokio::test(start_paused = true)]
async fn subscriptions_are_confined_to_the_token_scope() {
    let context = context(ServerSettings::default(), &[]);
    let scope =
        Scope { organizations: Some(vec!["quant".into()]), domains: None, expires_at: None };
    let mut client = connect(&context, scope, Ok(None), 100);
    client.json().await;
    client.send(json!({"action": "subscribe", "filter": {"organization_id": "acme"}, "ref": 1}));
    let reply = client.json().await;
    assert_eq!((reply["code"].as_str(), reply["ref"].as_i64()), (Some("forbidden"), Some(1)));
    client.send(json!({"action": "subscribe"}));
    assert_eq!(client.json().await["filter"]["organization_id"], json!(["quant"]));
}

#[tokio::test(start_paused = true)]
async fn the_handshake_query_subscribes_or_says_why_not() {
    let context = context(ServerSettings::default(), &agents(1..=3));
    let mut client =
        connect(&context, Scope::everything(), Ok(Some((Filter::all(), Start::Live))), 100);
    assert_eq!(client.json().await["type"], "welcome");
    let subscribed = client.json().await;
    assert_eq!(
        (subscribed["subscription_id"].as_str(), subscribed["last_id"].as_u64()),
        (Some("s1"), Some(3))
    );

    let refused = Err(ProtocolError::bad_request("query parameter since=\"x\" is not an event id"));
    let mut client = connect(&context, Scope::everything(), refused, 100);
    assert_eq!(client.json().await["type"], "welcome");
    assert_eq!(client.json().await["code"], "bad_request");
    assert_eq!(client.sync("still open").await, [] as [Value; 0]);
}

#[tokio::test(start_paused = true)]
async fn a_flood_gets_rate_limited_then_closed_with_1008() {
    let limits = ServerSettings { message_rate: 10, message_burst: 5, ..ServerSettings::default() };
    let context = context(limits, &[]);
    let mut client = open(&context);
    client.json().await;
    // All sent at one instant of the paused clock: nothing refills the bucket.
    for n in 0..40 {
        client.send(json!({"action": "ping", "ref": n}));
    }
    let (frames, close) = client.until_close().await;
    let types: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap_or("?")).collect();
    let codes: Vec<&str> = frames.iter().filter_map(|f| f["code"].as_str()).collect();
    assert_eq!(types[..5], ["pong"; 5], "the burst is answered");
    assert_eq!(codes, ["rate_limited"; 10], "then refused, twice the burst");
    assert_eq!(frames.len(), 15);
    let refs: Vec<&Value> = frames.iter().map(|f| &f["ref"]).collect();
    let sent: Vec<Value> = (0..15).map(|n| json!(n)).collect();
    assert_eq!(refs, sent.iter().collect::<Vec<_>>(), "a refusal answers its frame");
    assert_eq!(close, Some((1008, "rate limit exceeded".into())));
    assert_eq!(client.next().await, None, "the socket is closed");
}
