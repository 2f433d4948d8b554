//! `rowcast demo` end to end: the real binary, a real WebSocket client, a clean SIGTERM.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Starting includes initdb and a Postgres start on a machine other tests keep busy.
const START: Duration = Duration::from_secs(120);
const CONNECT: Duration = Duration::from_secs(30);
const FIRST_EVENT: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(60);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Everything `reader` produces, collected in the background (for failure messages).
fn collect(mut reader: impl AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    tokio::spawn(async move {
        let mut buffer = [0; 4096];
        while let Ok(n @ 1..) = reader.read(&mut buffer).await {
            sink.lock().expect("lock").push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

/// The value printed after `label` in the demo's banner (`  label   value`).
fn field<'a>(banner: &'a str, label: &str) -> Option<&'a str> {
    banner.lines().find_map(|line| {
        let (name, value) = line.trim_start().split_once(' ')?;
        (name == label).then(|| value.trim())
    })
}

#[allow(unsafe_code)]
fn sigterm(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(result, 0, "kill: {}", std::io::Error::last_os_error());
}

/// The next text frame as JSON, skipping pings and pongs.
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_live_events_and_cleans_up_on_sigterm() {
    let port = rowcast::apps::cluster::free_port().expect("a free port");
    let address = format!("127.0.0.1:{port}");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["demo", "--listen", &address, "--rate", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start rowcast demo");
    let log = collect(demo.stderr.take().expect("stderr"));
    let log = move || log.lock().expect("lock").clone();

    // The banner ends with how to stop the demo.
    let mut stdout = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let banner = tokio::time::timeout(START, async {
        let mut banner = String::new();
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Ctrl-C") {
                return banner;
            }
        }
        panic!("the demo ended before it was ready:\n{banner}\n{}", log());
    })
    .await
    .unwrap_or_else(|_| panic!("the demo did not start within {START:?}:\n{}", log()));

    assert_eq!(field(&banner, "page"), Some(format!("http://{address}/").as_str()), "{banner}");
    let websocket = format!("ws://{address}/ws/events");
    assert_eq!(field(&banner, "websocket"), Some(websocket.as_str()), "{banner}");
    let history = format!("http://{address}/api/events?limit=10");
    assert_eq!(field(&banner, "history"), Some(history.as_str()), "{banner}");
    let tail = format!("rowcast tail --url ws://{address} --type 'agent.*'");
    assert_eq!(field(&banner, "tail"), Some(tail.as_str()), "{banner}");
    let cluster = PathBuf::from(field(&banner, "cluster").expect("cluster line"));
    assert!(cluster.is_dir(), "{} does not exist", cluster.display());

    let (mut socket, welcome) = tokio::time::timeout(CONNECT, async {
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("{websocket}?type=*&severity=debug"))
                .await
                .unwrap_or_else(|e| panic!("connect to {websocket}: {e}\n{}", log()));
        let welcome = next_json(&mut socket).await;
        (socket, welcome)
    })
    .await
    .unwrap_or_else(|_| panic!("no welcome from {websocket} within {CONNECT:?}:\n{}", log()));
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    // Control frames have no dot in their type; events always do.
    let event = tokio::time::timeout(FIRST_EVENT, async {
        loop {
            let frame = next_json(&mut socket).await;
            if frame["type"].as_str().is_some_and(|t| t.contains('.')) {
                return frame;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event within {FIRST_EVENT:?}:\n{}", log()));
    assert!(event["id"].as_u64().is_some_and(|id| id > 0), "{event}");
    // The workload also emits application events from SQL (agent heartbeats, build lines).
    let app = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let frame = next_json(&mut socket).await;
            if frame["source"]["kind"] == "app" {
                return frame;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no application event within 30 s:\n{}", log()));
    assert_eq!(app["source"]["via"], "sql", "{app}");

    // Stop it with a client still connected, as an operator would.
    sigterm(demo.id().expect("demo pid"));
    let status = tokio::time::timeout(EXIT, demo.wait())
        .await
        .unwrap_or_else(|_| panic!("the demo did not stop within {EXIT:?}:\n{}", log()))
        .expect("wait for the demo");
    assert!(status.success(), "the demo exited with {status}:\n{}", log());
    assert!(!cluster.exists(), "{} is still there", cluster.display());
}
