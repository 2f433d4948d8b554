//! Issue 16's acceptance (SPEC §10): the scaled topology under faults, with real processes.
//!
//! Three NATS servers (JetStream, stream R3), two `rowcast serve --role publisher` and three
//! `--role gateway` processes over one Postgres; 60 clients spread over the gateways, each
//! with a random filter (the generator and the independent matcher of issue 14's acceptance)
//! and `since: 0`; two writers commit random row changes and post application events (to
//! whichever publisher takes them) throughout. Meanwhile: `kill -9` the active publisher (the
//! standby's takeover is timed, printed and must take under 5 s), `kill -9` the NATS server
//! that leads the stream, `kill -9` one gateway (its clients reconnect to the others with
//! `since` = the last id they hold) and start it again. Afterwards every client holds exactly the events its filter picks
//! from the log, once each, in id order. Prints its seed; `ROWCAST_ACCEPT_SEED=N` repeats it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rowcast::config::Role;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::acceptance::{Workload, fields, filter, seed};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::client::is_event;
use crate::support::matcher::picked;
use crate::support::nats::{Process, cluster, stream_leader, try_post};
use crate::support::{TestDb, wait_until_ready};

const CLIENTS: usize = 60;
const GATEWAYS: usize = 3;
const WAIT: Duration = Duration::from_secs(60);
/// How long the writers write; the faults happen within it.
const WRITING: Duration = Duration::from_secs(14);

/// What one client holds: event ids in arrival order, and how often it reconnected.
#[derive(Default)]
struct Held {
    ids: Vec<u64>,
    reconnects: usize,
}

/// The gateways clients may use: their addresses and whether each is up.
struct Gateways {
    addrs: Vec<SocketAddr>,
    up: Vec<AtomicBool>,
}

impl Gateways {
    /// The first gateway that is up, from `start` on.
    fn pick(&self, start: usize) -> SocketAddr {
        (0..self.addrs.len())
            .map(|i| (start + i) % self.addrs.len())
            .find(|i| self.up[*i].load(Ordering::Relaxed))
            .map_or(self.addrs[start % self.addrs.len()], |i| self.addrs[i])
    }
}

/// One client: subscribes with `filter` from `since: 0`, reads until `stop`, and after losing
/// its connection resumes on the next gateway up with `since` = the last id it holds.
async fn client(
    index: usize,
    filter: Value,
    gateways: Arc<Gateways>,
    held: Arc<Mutex<Held>>,
    stop: CancellationToken,
) {
    let mut at = index % GATEWAYS;
    loop {
        let since = held.lock().expect("held").ids.last().copied().unwrap_or(0);
        let url = format!("ws://{}/ws/events", gateways.pick(at));
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = tokio_tungstenite::connect_async(&url) => connected,
        };
        let Ok((socket, _)) = connected else {
            at += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut socket = socket;
        let subscribe = json!({"action": "subscribe", "filter": filter, "since": since});
        if socket.send(Message::text(subscribe.to_string())).await.is_err() {
            at += 1;
            continue;
        }
        loop {
            let incoming = tokio::select! {
                () = stop.cancelled() => return,
                incoming = tokio::time::timeout(Duration::from_secs(120), socket.next()) => incoming,
            };
            let text = match incoming {
                Err(_) => panic!("client {index} on {url}: nothing for 120 s"),
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => break,
                Ok(Some(Ok(_))) => continue,
            };
            let frame: Value = serde_json::from_str(text.as_str()).expect("frames are JSON");
            if is_event(&frame) {
                let id = frame["id"].as_u64().expect("id");
                held.lock().expect("held").ids.push(id);
            } else {
                let kind = frame["type"].as_str().unwrap_or_default();
                assert!(!matches!(kind, "error" | "reset"), "client {index} on {url}: {frame}");
            }
        }
        // The gateway went away: resume elsewhere.
        held.lock().expect("held").reconnects += 1;
        at += 1;
    }
}

/// Commits random transactions and posts application events until `stop`; an application
/// event goes to whichever publisher takes it (the standby refuses; a dead one does not answer).
async fn writer(
    db_url: String,
    seed: u64,
    first_row: u64,
    publishers: Vec<SocketAddr>,
    stop: CancellationToken,
) {
    let client = crate::support::connect(&db_url).await;
    let mut workload = Workload::new(seed).starting_at(first_row);
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        if rng.random_bool(0.15) {
            let body = workload.app_events().to_string();
            'posted: for _ in 0..100 {
                for addr in &publishers {
                    if let Some((201, _)) = try_post(*addr, "/api/events", body.as_bytes()).await {
                        break 'posted;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } else {
            let sql = workload.transaction();
            client.batch_execute(&sql).await.unwrap_or_else(|err| panic!("{sql}: {err}"));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_gateways_and_nats_fail_and_every_client_holds_its_filter() {
    let started = Instant::now();
    let seed = seed("scaled");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nats = cluster(3);
    let urls = nats.url_list();
    let db = TestDb::migrated().await;
    db.client().await.batch_execute(&Workload::seed_sql()).await.expect("seed");

    let mut active = Process::serve(&db, Role::Publisher, &urls, &[]);
    wait_until_ready(&db, active.addr).await;
    active.until_state("streaming", WAIT).await;
    let standby = Process::serve(&db, Role::Publisher, &urls, &[]);
    standby.wait_ready(WAIT).await;
    standby.until_state("standby", WAIT).await;
    let mut gateways: Vec<Process> =
        (0..GATEWAYS).map(|_| Process::serve(&db, Role::Gateway, &urls, &[])).collect();
    for gateway in &gateways {
        gateway.wait_ready(WAIT).await;
    }
    let shared = Arc::new(Gateways {
        addrs: gateways.iter().map(|g| g.addr).collect(),
        up: (0..GATEWAYS).map(|_| AtomicBool::new(true)).collect(),
    });
    eprintln!("scaled: topology up after {:?}", started.elapsed());

    let fields = fields();
    let filters: Vec<Value> = (0..CLIENTS).map(|_| filter(&mut rng, &fields)).collect();
    let stop_clients = CancellationToken::new();
    let held: Vec<Arc<Mutex<Held>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            tokio::spawn(client(
                i,
                f.clone(),
                shared.clone(),
                held[i].clone(),
                stop_clients.clone(),
            ))
        })
        .collect();

    let stop_writing = CancellationToken::new();
    let publishers = vec![active.addr, standby.addr];
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let (seed, first_row) = (seed.wrapping_add(i), i * 1_000_000);
            tokio::spawn(writer(
                db.url.clone(),
                seed,
                first_row,
                publishers.clone(),
                stop_writing.clone(),
            ))
        })
        .collect();

    // The faults, while the writers write.
    let writing_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    active.kill();
    let takeover = standby.until_state("streaming", Duration::from_secs(30)).await;
    eprintln!("scaled: the standby publisher took over {} ms after kill -9", takeover.as_millis());
    assert!(takeover < Duration::from_secs(5), "takeover took {takeover:?}");

    tokio::time::sleep(Duration::from_secs(2)).await;
    // The stream's leader: the harshest server to lose.
    let leader = stream_leader(&nats.url(0), "ROWCAST").await.expect("the stream's leader");
    let index = nats.index_of(&leader).expect("a server of the cluster");
    nats.kill(index);
    eprintln!(
        "scaled: killed NATS server {leader}, the stream's leader, at {:?}",
        writing_since.elapsed()
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    shared.up[0].store(false, Ordering::Relaxed);
    let killed = gateways[0].addr;
    gateways[0].kill();
    eprintln!("scaled: killed gateway 1 at {:?}", writing_since.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    gateways[0] = Process::serve_on(killed, &db, Role::Gateway, &urls, &[]);
    gateways[0].wait_ready(WAIT).await;
    shared.up[0].store(true, Ordering::Relaxed);
    eprintln!("scaled: gateway 1 back at {:?}", writing_since.elapsed());

    tokio::time::sleep(WRITING.saturating_sub(writing_since.elapsed())).await;
    stop_writing.cancel();
    for writer in writers {
        writer.await.expect("writer");
    }
    let log = db.settled_events().await;
    eprintln!("scaled: {} events written in {:?}", log.len(), writing_since.elapsed());

    // Every client gets to the last event its filter picks, then nothing more comes.
    let expected: Vec<Vec<u64>> = filters.iter().map(|f| picked(f, &log)).collect();
    let deadline = Instant::now() + WAIT;
    let done = AtomicUsize::new(0);
    while Instant::now() < deadline {
        done.store(0, Ordering::Relaxed);
        for (held, expected) in held.iter().zip(&expected) {
            let last = held.lock().expect("held").ids.last().copied();
            if last >= expected.last().copied() {
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
        if done.load(Ordering::Relaxed) == CLIENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_clients.cancel();
    for client in clients {
        client.await.expect("client");
    }

    let mut reconnected = 0;
    for (i, (held, expected)) in held.iter().zip(&expected).enumerate() {
        let held = held.lock().expect("held");
        reconnected += usize::from(held.reconnects > 0);
        assert_eq!(
            held.ids, *expected,
            "client {i} (filter {}, {} reconnects): what it holds against what its filter picks from the log",
            filters[i], held.reconnects
        );
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    eprintln!(
        "scaled: {CLIENTS} clients hold exactly their {total} events ({} events in the log; {reconnected} clients reconnected); {:?} in all",
        log.len(),
        started.elapsed()
    );
    assert!(reconnected >= CLIENTS / GATEWAYS, "the killed gateway's clients reconnected");
    let picking = expected.iter().filter(|e| !e.is_empty()).count();
    assert!(picking >= CLIENTS / 6, "only {picking} filters pick events");
}
