//! `rowcast tail`, the real binary, against a scripted WebSocket server speaking SPEC §5.

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::support::certs::Certs;

const WAIT: Duration = Duration::from_secs(20);

/// An event as tail must print it.
fn envelope(id: u64) -> String {
    format!(
        r#"{{"id":{id},"type":"agent.updated","timestamp":"2026-11-22T10:15:30.00000{id}Z","organization_id":"quant","domain_id":"demo","severity":"info","data":{{"id":"agt-{id}","score":1.50,"name":"caf\u00e9"}},"old":null,"changed":["score"],"source":{{"table":"public.agents","op":"update","xid":7301}}}}"#
    )
}

/// The same event as the server sends it, with `subscription_ids` in the middle.
fn event(id: u64) -> Message {
    let tagged =
        envelope(id).replacen(r#","timestamp""#, r#","subscription_ids":["s1"],"timestamp""#, 1);
    Message::text(tagged)
}

fn control(json: &str) -> Message {
    Message::text(json.to_owned())
}

/// Accepts one WebSocket connection and returns it with its query string.
#[allow(clippy::result_large_err)] // the callback's type is tungstenite's
async fn accept(listener: &TcpListener) -> (WebSocketStream<TcpStream>, String) {
    let (stream, _) = listener.accept().await.expect("accept");
    let mut query = String::new();
    let socket = tokio_tungstenite::accept_hdr_async(stream, |request: &Request, response| {
        query = request.uri().query().unwrap_or_default().to_owned();
        Ok::<Response, ErrorResponse>(response)
    })
    .await
    .expect("websocket handshake");
    (socket, query)
}

async fn send_all<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
    messages: Vec<Message>,
) {
    for message in messages {
        socket.send(message).await.expect("send");
    }
}

/// Reads until the client's close frame and returns its code.
async fn close_code<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
) -> Option<u16> {
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Close(frame) = message {
            return frame.map(|frame| u16::from(frame.code));
        }
    }
    None
}

/// `rowcast tail` as a user runs it, with stdout piped and stderr collected.
struct Tail {
    child: Child,
    stdout: Option<tokio::io::Lines<BufReader<ChildStdout>>>,
    stderr: JoinHandle<String>,
}

impl Tail {
    fn spawn(args: &[&str]) -> Self {
        Self::spawn_command(Command::new(env!("CARGO_BIN_EXE_rowcast")), args)
    }

    /// With `roots` as the only trusted root certificates (SSL_CERT_FILE).
    fn spawn_with_roots(args: &[&str], roots: &std::path::Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rowcast"));
        command.env("SSL_CERT_FILE", roots).env_remove("SSL_CERT_DIR");
        Self::spawn_command(command, args)
    }

    fn spawn_command(mut command: Command, args: &[&str]) -> Self {
        command.arg("tail").args(args).env("RUST_LOG", "info");
        for var in [
            "ROWCAST_URL",
            "ROWCAST_TOKEN",
            "ROWCAST_TAIL_TYPE",
            "ROWCAST_TAIL_SINCE",
            "ROWCAST_TAIL_WHERE",
            "ROWCAST_TAIL_HISTORY",
        ] {
            command.env_remove(var);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rowcast tail");
        let stdout = child.stdout.take().map(|stdout| BufReader::new(stdout).lines());
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Self { child, stdout, stderr }
    }

    async fn line(&mut self) -> String {
        let stdout = self.stdout.as_mut().expect("stdout");
        match tokio::time::timeout(WAIT, stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = self.child.start_kill();
                let stderr = (&mut self.stderr).await.unwrap_or_default();
                panic!("no line from rowcast tail ({other:?}); its stderr:\n{stderr}")
            }
        }
    }

    /// Waits for the exit; returns whether it succeeded, and stderr.
    async fn exit(mut self) -> (bool, String) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("rowcast tail did not exit")
            .expect("wait");
        (status.success(), self.stderr.await.expect("stderr"))
    }

    #[allow(unsafe_code)]
    fn terminate(&self) {
        let pid = self.child.id().expect("still running") as libc::pid_t;
        // SAFETY: kill(2) touches no memory of ours; pid is our child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_slow_consumer_close_without_loss_or_duplicates() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    // The base URL, with http://: tail finds /ws/events and speaks ws:// itself.
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move {
        let (mut socket, first) = accept(&listener).await;
        send_all(
            &mut socket,
            vec![
                control(r#"{"type":"welcome","connection_id":"c1","last_id":0}"#),
                control(r#"{"type":"subscribed","subscription_id":"s1","filter":{},"last_id":0}"#),
                event(1),
                event(2),
                event(3),
            ],
        )
        .await;
        let slow =
            CloseFrame { code: 4008.into(), reason: "slow consumer; last delivered id 3".into() };
        socket.close(Some(slow)).await.expect("close");
        // The first socket stays open: after a close frame, tail must not wait for TCP's end.
        let _first_socket = socket;

        let (mut socket, second) = accept(&listener).await;
        send_all(
            &mut socket,
            vec![
                control(r#"{"type":"welcome","connection_id":"c2","last_id":5}"#),
                control(r#"{"type":"subscribed","subscription_id":"s1","filter":{},"last_id":5}"#),
                event(3),
                event(4),
                event(5),
                control(r#"{"type":"caught_up","subscription_id":"s1","last_id":5}"#),
            ],
        )
        .await;
        (first, second, close_code(&mut socket).await)
    });

    let mut tail = Tail::spawn(&[
        "--url",
        &url,
        "--type",
        "agent.*,deployment.failed",
        "--organization-id",
        "quant",
    ]);
    let mut printed = Vec::new();
    for _ in 1..=5 {
        printed.push(tail.line().await);
    }
    assert_eq!(printed, (1..=5).map(envelope).collect::<Vec<_>>());

    tail.terminate();
    let mut stdout = tail.stdout.take().expect("stdout");
    let (success, stderr) = tail.exit().await;
    assert!(success, "rowcast tail failed on SIGTERM; its stderr:\n{stderr}");
    assert_eq!(stdout.next_line().await.expect("read"), None, "more on stdout than events 1..5");
    assert!(stderr.contains("slow consumer"), "the 4008 close is not reported:\n{stderr}");

    let (first, second, close) = tokio::time::timeout(WAIT, server)
        .await
        .expect("server script did not finish")
        .expect("server script");
    assert_eq!(first, "type=agent.*&type=deployment.failed&organization_id=quant");
    assert_eq!(second, "type=agent.*&type=deployment.failed&organization_id=quant&since=3");
    assert_eq!(close, Some(1000), "tail did not close the socket politely");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::result_large_err)] // the callback's type is tungstenite's
async fn a_refused_handshake_ends_tail_with_a_clear_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws/events", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut authorization = None;
        let refused = tokio_tungstenite::accept_hdr_async(stream, |request: &Request, _| {
            authorization = request.headers().get("authorization").cloned();
            let mut refusal = ErrorResponse::new(Some("invalid token".into()));
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            Err::<Response, _>(refusal)
        })
        .await;
        assert!(refused.is_err());
        authorization
    });

    let output = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_rowcast"))
            .args(["tail", "--url", &url])
            .env("ROWCAST_TOKEN", "secret-test-token")
            .output(),
    )
    .await
    .expect("rowcast tail kept retrying a 401")
    .expect("run rowcast tail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(
        stderr.contains("refused the WebSocket handshake: HTTP 401 Unauthorized: invalid token"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret-test-token"), "the token leaked:\n{stderr}");
    let authorization = server.await.expect("server script");
    assert_eq!(
        authorization.as_ref().and_then(|value| value.to_str().ok()),
        Some("Bearer secret-test-token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_quietly_when_stdout_is_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    let (reader_gone, gone) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut socket, _) = accept(&listener).await;
        send_all(&mut socket, vec![event(1)]).await;
        let _ = gone.await;
        send_all(&mut socket, vec![event(2), event(3)]).await;
        close_code(&mut socket).await
    });

    // `rowcast tail | head -1`
    let mut tail = Tail::spawn(&["--url", &url]);
    assert_eq!(tail.line().await, envelope(1));
    drop(tail.stdout.take());
    let _ = reader_gone.send(());
    let (success, stderr) = tail.exit().await;
    assert!(success, "{stderr}");
    assert!(!stderr.contains("ERROR") && !stderr.contains("Error"), "{stderr}");
    let close = tokio::time::timeout(WAIT, server).await.expect("server").expect("server");
    assert_eq!(close, Some(1000));
}

/// A wss:// server: TLS (tokio-rustls) with the test CA's certificate for `localhost`.
async fn tls_listener(certs: &Certs) -> (TcpListener, TlsAcceptor) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(certs.server_cert())
        .expect("server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("server.pem");
    let key = PrivateKeyDer::from_pem_file(certs.server_key()).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server certificate");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    (listener, TlsAcceptor::from(std::sync::Arc::new(config)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_urls_are_tailed_over_tls_with_the_system_roots() {
    let certs = Certs::new();
    let (listener, acceptor) = tls_listener(&certs).await;
    let url = format!("wss://localhost:{}", listener.local_addr().expect("address").port());
    let server = tokio::spawn(async move {
        // The first client does not trust the CA: its handshake fails, and it stops.
        let (tcp, _) = listener.accept().await.expect("accept");
        assert!(acceptor.accept(tcp).await.is_err(), "an untrusting client finished the handshake");
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(tcp).await.expect("TLS handshake");
        let mut socket = tokio_tungstenite::accept_async(tls).await.expect("websocket handshake");
        send_all(
            &mut socket,
            vec![
                control(r#"{"type":"welcome","connection_id":"c1","last_id":0}"#),
                control(r#"{"type":"subscribed","subscription_id":"s1","filter":{},"last_id":0}"#),
                event(1),
            ],
        )
        .await;
        close_code(&mut socket).await
    });

    // Roots come from the system store, which SSL_CERT_FILE replaces.
    let untrusting = Tail::spawn_with_roots(&["--url", &url], &certs.other_ca());
    let (success, stderr) = untrusting.exit().await;
    assert!(!success, "tail trusted a certificate of another CA:\n{stderr}");
    assert!(
        stderr.contains("certificate is refused") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );

    let mut tail = Tail::spawn_with_roots(&["--url", &url], &certs.ca());
    assert_eq!(tail.line().await, envelope(1));
    tail.terminate();
    let (success, stderr) = tail.exit().await;
    assert!(success, "rowcast tail failed on SIGTERM; its stderr:\n{stderr}");
    let close = tokio::time::timeout(WAIT, server).await.expect("server script").expect("server");
    assert_eq!(close, Some(1000), "tail did not close the TLS socket politely");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_tail_even_when_stdout_is_stalled() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    let (stalled, is_stalled) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut socket, _) = accept(&listener).await;
        let padding = "x".repeat(4096);
        for id in 1.. {
            let event = format!(r#"{{"id":{id},"type":"agent.updated","data":"{padding}"}}"#);
            let sent =
                tokio::time::timeout(Duration::from_secs(1), socket.send(Message::text(event)));
            if sent.await.is_err() {
                // Nobody reads tail's stdout, so tail stopped reading the socket.
                let _ = stalled.send(());
                break;
            }
        }
        close_code(&mut socket).await
    });

    let tail = Tail::spawn(&["--url", &url]);
    tokio::time::timeout(WAIT * 3, is_stalled).await.expect("never stalled").expect("server");
    tail.terminate();
    let (success, stderr) = tail.exit().await;
    assert!(success, "{stderr}");
    server.abort();
}

/// `--where` and `--history` against a real server: the last N matching events first, then
/// live matching ones, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_and_history_print_the_last_matches_then_live_ones() {
    let db = crate::support::TestDb::migrated().await;
    let mut server = crate::support::Running::start(db.settings()).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO organizations (id, name) VALUES ('quant', 'Quant');
             INSERT INTO agents (id, organization_id, name)
                  SELECT 'a' || n, 'quant', 'agent ' || n FROM generate_series(1, 6) n;
             UPDATE agents SET status = CASE WHEN id IN ('a1', 'a3', 'a5') THEN 'error'
                                             ELSE 'active' END;",
        )
        .await
        .expect("workload");
    // 1 organization + 6 inserts + 6 updates, each with its status_changed.
    server.wait_for_id(19, Duration::from_secs(30)).await;

    let url = format!("http://{}", server.addr);
    let mut tail = Tail::spawn(&[
        "--url",
        &url,
        "--type",
        "agent.updated",
        "--where",
        "status:eq:error",
        "--history",
        "2",
    ]);
    let agent = |line: &str| {
        let event: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(
            (event["type"].as_str(), event["data"]["status"].as_str()),
            (Some("agent.updated"), Some("error")),
            "{line}"
        );
        event["data"]["id"].as_str().expect("id").to_owned()
    };
    assert_eq!([agent(&tail.line().await), agent(&tail.line().await)], ["a3", "a5"]);
    // Live from here: a non-matching update, then a matching one.
    client.batch_execute("UPDATE agents SET status = 'paused' WHERE id = 'a2'").await.expect("a2");
    client.batch_execute("UPDATE agents SET status = 'error' WHERE id = 'a4'").await.expect("a4");
    assert_eq!(agent(&tail.line().await), "a4");
    tail.terminate();
    let (success, stderr) = tail.exit().await;
    assert!(success, "{stderr}");
    server.stop().await;
}
