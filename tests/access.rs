//! Access (SPEC §5, §6): tokens, scopes, origins and limits, with real clients; every refusal.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use jsonwebtoken::{EncodingKey, Header};
use rowcast::auth::Auth;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::client::{Incoming, Ws, get, is_event};
use crate::support::{Running, TestDb};

const SECRET: &str = "access-test-secret-of-32-bytes-or-more";
const WAIT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn token(orgs: &[&str], domains: Option<&[&str]>, exp: u64, secret: &str) -> String {
    let mut claims = json!({"sub": "tester", "exp": exp, "orgs": orgs});
    if let Some(domains) = domains {
        claims["domains"] = json!(domains);
    }
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("encode")
}

fn quant_token() -> String {
    token(&["quant"], None, now() + 3600, SECRET)
}

async fn start(db: &TestDb, tweak: impl FnOnce(&mut rowcast::config::Settings)) -> Running {
    let mut settings = db.settings();
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.server.auth = Auth::new("jwt", Some(SECRET), None, local).expect("auth");
    tweak(&mut settings);
    Running::start(settings).await
}

/// Tries a handshake; returns the HTTP status of a refusal, or the socket.
async fn handshake(url: &str, headers: &[(&str, &str)]) -> Result<(Ws, Option<String>), u16> {
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .expect("name");
        request.headers_mut().insert(name, HeaderValue::from_str(value).expect("header"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().expect("ascii").to_owned());
            Ok((Ws::new(socket), protocol))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("handshake failed oddly: {err}"),
    }
}

/// A GET with headers; returns the status and JSON body.
async fn get_with(
    addr: std::net::SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = authorization.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_says_why() {
    let db = TestDb::migrated().await;
    let server = start(&db, |s| {
        s.server.allowed_origins = Some(vec!["https://app.example".into()]);
        s.server.max_subscriptions = 2;
        s.server.max_frame_bytes = 4096;
    })
    .await;
    let url = server.ws_url("");
    let addr = server.addr;

    // No token, a forged one, an expired one: 401 before the upgrade, over WebSocket and HTTP.
    assert_eq!(handshake(&url, &[]).await.err(), Some(401));
    let forged = token(&["quant"], None, now() + 3600, "not-the-secret");
    let expired = token(&["quant"], None, now() - 10, SECRET);
    for bad in [&forged, &expired] {
        let auth = format!("Bearer {bad}");
        assert_eq!(handshake(&url, &[("authorization", &auth)]).await.err(), Some(401));
        assert_eq!(get_with(addr, "/api/events", Some(bad)).await.0, 401);
    }
    let (status, body) = get(addr, "/api/events").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(get(addr, "/api/events/stats").await.0, 401);
    assert_eq!(get(addr, "/healthz").await.0, 200, "health needs no token");

    // A foreign origin: 403; the allowed one and non-browser clients pass.
    let good = quant_token();
    let auth = format!("Bearer {good}");
    let evil = [("authorization", auth.as_str()), ("origin", "https://evil.example")];
    assert_eq!(handshake(&url, &evil).await.err(), Some(403));
    let fine = [("authorization", auth.as_str()), ("origin", "https://app.example")];
    assert!(handshake(&url, &fine).await.is_ok());

    // The token as a subprotocol (browsers) gets `rowcast.v1` back; as `?token=` it works too.
    let protocols = format!("rowcast.v1, rowcast.bearer.{good}");
    let (_, protocol) =
        handshake(&url, &[("sec-websocket-protocol", &protocols)]).await.expect("subprotocol");
    assert_eq!(protocol.as_deref(), Some("rowcast.v1"));
    let (mut ws, _) =
        handshake(&server.ws_url(&format!("token={good}")), &[]).await.expect("query token");
    assert_eq!(ws.frame().await["type"], "welcome");

    // A foreign organization: forbidden, over WebSocket and HTTP.
    ws.send(json!({"action": "subscribe", "filter": {"organization_id": "acme"}, "ref": 1})).await;
    let reply = ws.frame().await;
    assert_eq!((reply["code"].as_str(), &reply["ref"]), (Some("forbidden"), &json!(1)), "{reply}");
    let (status, body) = get_with(addr, "/api/events?organization_id=acme", Some(&good)).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, _) = get_with(addr, "/api/events?organization_id=quant", Some(&good)).await;
    assert_eq!(status, 200);

    // Too many subscriptions.
    ws.subscribe(json!({}), None).await;
    ws.subscribe(json!({"type": "agent.*"}), None).await;
    ws.send(json!({"action": "subscribe", "filter": {}})).await;
    assert_eq!(ws.frame().await["code"], "too_many_subscriptions");

    // An oversized frame: 1009.
    ws.send_raw(Message::text("x".repeat(8192))).await;
    match ws.next_within(WAIT).await {
        Some(Incoming::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected 1009, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_rate_limited_then_closed_and_disturbs_no_one() {
    let db = TestDb::migrated().await;
    let mut server = start(&db, |s| {
        s.server.message_rate = 5;
        s.server.message_burst = 5;
    })
    .await;
    let good = quant_token();
    let (mut steady, _) = handshake(&server.ws_url(&format!("token={good}&type=agent.*")), &[])
        .await
        .expect("steady");
    assert_eq!(steady.frame().await["type"], "welcome");
    assert_eq!(steady.frame().await["type"], "subscribed");
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q')")
        .await
        .expect("org");

    // Floods of malformed frames, reconnecting each time they are cut off.
    let url = server.ws_url(&format!("token={good}"));
    let flooder = tokio::spawn(async move {
        let mut limited = 0;
        let mut closes = Vec::new();
        for _ in 0..3 {
            let (mut ws, _) = handshake(&url, &[]).await.expect("flooder connects");
            for i in 0..200 {
                if ws.socket.send(Message::text(format!("{{not json {i}"))).await.is_err() {
                    break;
                }
            }
            loop {
                match ws.next_within(WAIT).await.expect("frames then a close") {
                    Incoming::Frame(frame) if frame["code"] == "rate_limited" => limited += 1,
                    Incoming::Frame(_) => {}
                    Incoming::Closed(frame) => {
                        closes.push(frame.map(|f| u16::from(f.code)));
                        break;
                    }
                }
            }
        }
        (limited, closes)
    });
    for i in 0..300 {
        client
            .batch_execute(&format!(
                "INSERT INTO agents (id, organization_id, name) VALUES ('a{i}', 'quant', 'x')"
            ))
            .await
            .expect("insert");
    }
    let (limited, closes) = flooder.await.expect("flooder");
    assert!(limited > 0, "the flood got rate_limited errors first");
    assert_eq!(closes, [Some(1008); 3]);
    server.wait_for_id(301, WAIT).await;
    let frames = steady.drain().await;
    let ids: Vec<u64> =
        frames.iter().filter(|f| is_event(f)).map(|f| f["id"].as_u64().expect("id")).collect();
    assert_eq!(ids, (2..=301).collect::<Vec<u64>>(), "the steady client lost nothing");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_closes_with_4001_unless_refreshed() {
    let db = TestDb::migrated().await;
    let server = start(&db, |_| {}).await;
    // The lapsing token expires a second after the one to be refreshed: once it has closed,
    // the first expiry is well past.
    let short = token(&["quant"], None, now() + 2, SECRET);
    let shortish = token(&["quant"], None, now() + 3, SECRET);
    let (mut refreshed, _) =
        handshake(&server.ws_url(&format!("token={short}")), &[]).await.expect("connect");
    let (mut lapsing, _) =
        handshake(&server.ws_url(&format!("token={shortish}")), &[]).await.expect("connect");
    assert_eq!(refreshed.frame().await["type"], "welcome");
    assert_eq!(lapsing.frame().await["type"], "welcome");
    // A refresh must keep the same scope.
    refreshed
        .send(json!({"action": "auth", "token": token(&["acme"], None, now() + 3600, SECRET)}))
        .await;
    assert_eq!(refreshed.frame().await["code"], "forbidden");
    let later = now() + 3600;
    refreshed
        .send(
            json!({"action": "auth", "token": token(&["quant"], None, later, SECRET), "ref": "r"}),
        )
        .await;
    let reply = refreshed.frame().await;
    assert_eq!(reply, json!({"type": "authenticated", "expires_at": later, "ref": "r"}));
    match lapsing.next_within(Duration::from_secs(10)).await {
        Some(Incoming::Closed(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason.as_str(), "token expired");
        }
        other => panic!("expected 4001, got {other:?}"),
    }
    // The refreshed one outlived its first expiry.
    refreshed.send(json!({"action": "ping"})).await;
    assert_eq!(refreshed.frame().await["type"], "pong");
    server.stop().await;
}

/// Tenant isolation, as a randomized test against a real server: several organizations
/// (including an empty and a unicode id), thousands of events (some with a null scope), and
/// clients with random tokens and random filters. Live, on resume, in replay and in history, each client
/// receives exactly the events its filter matches within its token's scope, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_ever_sees_outside_its_claims() {
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::random();
    println!("isolation seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const ORGS: [&str; 4] = ["quant", "acme", "", "ünï"];
    const DOMAINS: [&str; 4] = ["d1", "d2", "", "dö"];
    const TYPES: [&str; 7] = [
        "*",
        "agent.*",
        "*.deleted",
        "user.created",
        "deployment.failed",
        "agent.status_changed",
        "*.truncated",
    ];

    let db = TestDb::migrated().await;
    let mut server = start(&db, |_| {}).await;
    let pick = |rng: &mut rand::rngs::StdRng, items: &[&str]| -> Vec<String> {
        let n = rng.random_range(1..=items.len().min(3));
        items.choose_multiple(rng, n).map(|s| (*s).to_owned()).collect()
    };
    // Clients: a token scope and a filter each.
    let mut clients = Vec::new();
    for _ in 0..10 {
        let orgs = if rng.random_bool(0.2) { vec!["*".to_owned()] } else { pick(&mut rng, &ORGS) };
        let domains = rng.random_bool(0.3).then(|| pick(&mut rng, &DOMAINS));
        let mut filter = json!({});
        if rng.random_bool(0.7) {
            filter["type"] = json!(pick(&mut rng, &TYPES));
        }
        if rng.random_bool(0.5) {
            // Sometimes within the claims, sometimes not: the latter must be refused.
            filter["organization_id"] = json!(pick(&mut rng, &ORGS));
        }
        if rng.random_bool(0.3) {
            filter["domain_id"] = json!(pick(&mut rng, &DOMAINS));
        }
        let org_refs: Vec<&str> = orgs.iter().map(String::as_str).collect();
        let domain_refs: Option<Vec<&str>> =
            domains.as_ref().map(|d| d.iter().map(String::as_str).collect());
        let token = token(&org_refs, domain_refs.as_deref(), now() + 3600, SECRET);
        clients.push((orgs, domains, filter, token));
    }
    let mut live = Vec::new();
    for (_, _, filter, token) in &clients {
        let (mut ws, _) =
            handshake(&server.ws_url(&format!("token={token}")), &[]).await.expect("connect");
        assert_eq!(ws.frame().await["type"], "welcome");
        ws.send(json!({"action": "subscribe", "filter": filter})).await;
        let reply = ws.frame().await;
        live.push((ws, reply));
    }

    let client = db.client().await;
    for org in ORGS {
        client
            .execute("INSERT INTO organizations (id, name) VALUES ($1, 'o')", &[&org])
            .await
            .expect("org");
    }
    for domain in DOMAINS {
        client
            .execute(
                "INSERT INTO domains (id, organization_id, name) VALUES ($1, 'quant', 'd')",
                &[&domain],
            )
            .await
            .expect("domain");
    }
    for i in 0..2000i32 {
        let org = *ORGS.choose(&mut rng).expect("org");
        let domain = DOMAINS.choose(&mut rng).copied().filter(|_| rng.random_bool(0.8));
        let sql = match i % 5 {
            0 | 1 => {
                "INSERT INTO agents (id, organization_id, domain_id, name) VALUES ('a' || $1::int, $2, $3, 'x')"
            }
            2 => {
                "UPDATE agents SET status = 'error', domain_id = $3 WHERE id = 'a' || ($1::int - 1) AND organization_id = $2"
            }
            3 => {
                "INSERT INTO users (id, organization_id, email, name, password_hash) VALUES ('u' || $1::int, $2, $1::int || '@x', 'u' || coalesce($3::text, ''), 'hunter2')"
            }
            _ => {
                "DELETE FROM users WHERE id = 'u' || ($1::int - 1) AND $2::text IS NOT NULL AND $3::text IS DISTINCT FROM 'zz'"
            }
        };
        client.execute(sql, &[&i, &org, &domain]).await.expect(sql);
    }
    client.batch_execute("TRUNCATE users").await.expect("truncate");
    let log = db.settled_events().await;
    let head = log.last().and_then(|e| e["id"].as_u64()).expect("events");
    server.wait_for_id(head, WAIT).await;
    assert!(log.len() > 1500, "{} events", log.len());
    assert!(
        !log.iter().any(|e| e.to_string().contains("hunter2")),
        "redacted columns never reach the log"
    );

    let addr = server.addr;
    for ((orgs, domains, filter, token), (mut ws, reply)) in clients.into_iter().zip(live) {
        let in_claims = |e: &Value| {
            let org_ok = orgs.contains(&"*".to_owned())
                || e["organization_id"].as_str().is_some_and(|o| orgs.iter().any(|g| g == o));
            let domain_ok = domains
                .as_ref()
                .is_none_or(|d| e["domain_id"].as_str().is_some_and(|x| d.iter().any(|g| g == x)));
            org_ok && domain_ok
        };
        let asked_outside = filter["organization_id"].as_array().is_some_and(|asked| {
            !orgs.contains(&"*".to_owned()) && asked.iter().any(|o| !orgs.iter().any(|g| g == o))
        }) || filter["domain_id"].as_array().is_some_and(|asked| {
            domains.as_ref().is_some_and(|d| asked.iter().any(|x| !d.iter().any(|g| g == x)))
        });
        if asked_outside {
            assert_eq!(reply["code"], "forbidden", "{filter} with {orgs:?}/{domains:?}: {reply}");
            continue;
        }
        assert_eq!(reply["type"], "subscribed", "{reply}");
        let expected: Vec<u64> = log
            .iter()
            .filter(|e| in_claims(e) && crate::delivery::matches(&filter, e))
            .map(|e| e["id"].as_u64().expect("id"))
            .collect();
        let event_ids = |frames: &[Value]| -> Vec<u64> {
            frames.iter().filter(|f| is_event(f)).map(|f| f["id"].as_u64().expect("id")).collect()
        };
        let context = format!("seed {seed}, token {orgs:?}/{domains:?}, filter {filter}");
        assert_eq!(event_ids(&ws.drain().await), expected, "live: {context}");

        let (mut resumed, _) =
            handshake(&server.ws_url(&format!("token={token}")), &[]).await.expect("connect");
        let mut request = json!({"action": "subscribe", "filter": filter, "since": 0});
        request["ref"] = json!("resume");
        resumed.send(request).await;
        let frames = resumed.through("caught_up").await;
        assert_eq!(event_ids(&frames), expected, "resume: {context}");

        resumed
            .send(json!({"action": "replay", "filter": filter, "from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z", "speed": 100}))
            .await;
        let mut replayed = Vec::new();
        loop {
            let frame = resumed.frame().await;
            if frame["type"] == "replay_finished" {
                break;
            }
            if is_event(&frame) && frame["replay_id"].is_string() {
                replayed.push(frame);
            }
        }
        assert_eq!(event_ids(&replayed), expected, "replay: {context}");

        let mut history = Vec::new();
        let mut since = 0;
        loop {
            let mut query = format!("since={since}&limit=1000");
            for (key, value) in filter.as_object().expect("object") {
                for item in value.as_array().cloned().unwrap_or_else(|| vec![value.clone()]) {
                    let item = item.as_str().expect("string").to_owned();
                    let encoded: String =
                        form_urlencoded::byte_serialize(item.as_bytes()).collect();
                    // Repeated parameters keep empty and comma-free ids distinct.
                    query.push_str(&format!("&{key}={encoded}"));
                }
            }
            let (status, body) =
                get_with(addr, &format!("/api/events?{query}"), Some(&token)).await;
            assert_eq!(status, 200, "{body}");
            let page = body["events"].as_array().expect("events").clone();
            if page.is_empty() {
                break;
            }
            since = body["next"].as_u64().expect("next");
            history.extend(page);
        }
        assert_eq!(event_ids(&history), expected, "history: {context}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    let db = TestDb::migrated().await;
    let addr = crate::support::free_addr();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["serve", "--auth", "jwt", "--listen", &addr.to_string(), "--slot", &db.name])
        .env("DATABASE_URL", &db.url)
        .env("ROWCAST_JWT_SECRET", SECRET)
        .env("RUST_LOG", "trace,tungstenite::protocol=trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        let _ = tokio::io::BufReader::new(stderr).read_to_string(&mut text).await;
        text
    });
    crate::support::wait_until_ready(&db, addr).await;
    let good = quant_token();
    let forged = token(&["*"], None, now() + 3600, "forged-secret");
    for token in [&good, &forged] {
        let _ = handshake(&format!("ws://{addr}/ws/events?token={token}"), &[]).await;
        let _ = get(addr, &format!("/api/events?token={token}")).await;
        let _ = get_with(addr, "/api/events", Some(token)).await;
    }
    let (mut ws, _) =
        handshake(&format!("ws://{addr}/ws/events?token={good}"), &[]).await.expect("connect");
    ws.send(json!({"action": "auth", "token": forged})).await;
    assert_eq!(ws.until("error").await["code"], "forbidden");
    let pid = child.id().expect("pid") as i32;
    assert_eq!(terminate(pid), 0);
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("stops").expect("status");
    assert!(status.success(), "{status}");
    let logs = logs.await.expect("logs");
    assert!(logs.contains("serving"), "the server ran and logged: {logs:.2000}");
    for token in [&good, &forged] {
        let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(token.as_str())).collect();
        assert!(leaks.is_empty(), "a token reached the logs: {leaks:#?}");
        let signature = token.rsplit('.').next().expect("signature");
        assert!(!logs.contains(signature), "a token signature reached the logs");
    }
}

/// SIGTERM to `pid`, through the `kill` command: the crate denies unsafe code.
fn terminate(pid: i32) -> i32 {
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    status.map(|s| s.code().unwrap_or(-1)).unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_and_connection_churn_leave_the_server_healthy() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::migrated().await;
    let mut server = start(&db, |_| {}).await;
    let good = quant_token();
    let url = server.ws_url(&format!("token={good}"));
    let (mut steady, _) = handshake(&format!("{url}&type=*"), &[]).await.expect("steady");
    assert_eq!(steady.frame().await["type"], "welcome");
    assert_eq!(steady.frame().await["type"], "subscribed");

    // A text frame that is not UTF-8 (masked with a zero key): closed with 1007.
    let (mut broken, _) = handshake(&url, &[]).await.expect("connect");
    assert_eq!(broken.frame().await["type"], "welcome");
    let raw = [0x81, 0x82, 0, 0, 0, 0, 0xc3, 0x28];
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = broken.socket.get_mut() else {
        panic!("plain")
    };
    tcp.write_all(&raw).await.expect("raw frame");
    match broken.next_within(WAIT).await {
        Some(Incoming::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1007),
        other => panic!("expected 1007, got {other:?}"),
    }

    // Churn: connections opened and dropped at once, some mid-handshake.
    for i in 0..200 {
        if i % 2 == 0 {
            let (ws, _) = handshake(&url, &[]).await.expect("connect");
            drop(ws);
        } else {
            let mut tcp = tokio::net::TcpStream::connect(server.addr).await.expect("tcp");
            let _ = tcp.write_all(b"GET /ws/events HTTP/1.1\r\nHost: x\r\n").await;
        }
    }
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO organizations (id, name) VALUES ('quant', 'Q')")
        .await
        .expect("org");
    server.wait_for_id(1, WAIT).await;
    let frames = steady.drain().await;
    assert_eq!(frames.iter().filter(|f| is_event(f)).count(), 1);
    // Every dropped connection has left the bus.
    let mut connections = Value::Null;
    for _ in 0..100 {
        let (_, stats) = get_with(server.addr, "/api/events/stats", Some(&good)).await;
        connections = stats["connections"].clone();
        if connections == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connections, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::migrated().await;
    let server = start(&db, |s| s.server.handshake_timeout = Duration::from_secs(1)).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.expect("tcp");
    tcp.write_all(b"GET /ws/events HTTP/1.1\r\nHost: x\r\n").await.expect("partial headers");
    let mut buffer = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buffer)).await;
    // hyper answers 408 or just closes; either way the socket ends.
    let ended = match read {
        Ok(Ok(0)) => true,
        Ok(Ok(n)) => String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 408"),
        Ok(Err(_)) => true,
        Err(_) => false,
    };
    assert!(ended, "the server kept a trickling client");
    server.stop().await;
}
