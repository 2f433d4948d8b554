//! A TCP fault proxy: sits between rowcast and Postgres and breaks connections on command, the
//! way networks and servers break them in production.
//!
//! ```text
//! rowcast --> 127.0.0.1:proxy --> upstream (Postgres)
//!               reset_all()        every open connection gets a TCP RST, both sides
//!               cut_on(pattern)    the first connection whose client sends `pattern` is reset
//!                                  before the bytes go through (a cut in mid-query)
//!               blackhole_open()   every open connection stops carrying bytes, both ways,
//!                                  sockets left open (a dead path: no FIN, no RST)
//!               blackhole_new(on)  new connections are accepted and then hear nothing (a
//!                                  server that does not answer)
//!               refuse(on)         new connections are reset at once (a server that is down)
//! ```
//!
//! Resets use SO_LINGER 0, so the peers see "connection reset", not an orderly close.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accepting: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
}

struct State {
    /// Cancelled by `reset_all`; every connection opened before holds a child of it.
    generation: CancellationToken,
    /// Stalled by `blackhole_open`; every connection opened before watches it.
    stall: watch::Sender<bool>,
    /// Whether new connections are held silent instead of forwarded.
    silent: bool,
    /// Whether new connections are reset at once.
    refuse: bool,
    /// Armed cuts: the first connection that sends one of these is reset.
    cuts: Vec<Vec<u8>>,
    /// Connections reset by an armed cut so far.
    cut_count: usize,
}

impl FaultProxy {
    /// A proxy on a free 127.0.0.1 port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        Self::start_on(0, upstream).await
    }

    /// A proxy on 127.0.0.1:`port` in front of `upstream`.
    pub async fn start_on(port: u16, upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                generation: CancellationToken::new(),
                stall: watch::channel(false).0,
                silent: false,
                refuse: false,
                cuts: Vec::new(),
                cut_count: 0,
            }),
        });
        let accepting = tokio::spawn(accept(listener, shared.clone()));
        FaultProxy { addr, shared, accepting }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `target` with its host and port replaced by the proxy's (TLS policy kept).
    pub fn route(&self, target: &rowcast::pg::Target) -> rowcast::pg::Target {
        let config = &target.config;
        // `host`/`port` append to a config: build one that names the proxy only.
        let mut routed = tokio_postgres::Config::new();
        if let Some(user) = config.get_user() {
            routed.user(user);
        }
        if let Some(password) = config.get_password() {
            routed.password(password);
        }
        if let Some(dbname) = config.get_dbname() {
            routed.dbname(dbname);
        }
        routed.host("127.0.0.1").port(self.port());
        rowcast::pg::Target { config: routed, tls: target.tls.clone() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resets every connection open now (new ones go through).
    pub fn reset_all(&self) {
        let mut state = self.state();
        state.generation.cancel();
        state.generation = CancellationToken::new();
    }

    /// Blackholes every connection open now; new ones go through.
    pub fn blackhole_open(&self) {
        let mut state = self.state();
        state.stall.send_replace(true);
        state.stall = watch::channel(false).0;
    }

    /// Resets new connections at once while `on`.
    pub fn refuse(&self, on: bool) {
        self.state().refuse = on;
    }

    /// Holds new connections silent (accepted, never answered) while `on`.
    pub fn blackhole_new(&self, on: bool) {
        self.state().silent = on;
    }

    /// Arms a cut: the first connection whose client sends `pattern` (e.g. a piece of a query's
    /// SQL) is reset before those bytes reach the server.
    pub fn cut_on(&self, pattern: &str) {
        self.state().cuts.push(pattern.as_bytes().to_vec());
    }

    /// Connections reset by armed cuts so far.
    pub fn cuts(&self) -> usize {
        self.state().cut_count
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.state().generation.cancel();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let (generation, stall, silent, refuse) = {
            let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            (state.generation.child_token(), state.stall.subscribe(), state.silent, state.refuse)
        };
        if refuse {
            let _ = client.set_zero_linger();
            continue;
        }
        if silent {
            tokio::spawn(async move {
                generation.cancelled().await;
                drop(client);
            });
            continue;
        }
        tokio::spawn(relay(client, shared.clone(), generation, stall));
    }
}

async fn relay(
    client: TcpStream,
    shared: Arc<Shared>,
    generation: CancellationToken,
    stall: watch::Receiver<bool>,
) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let cut = CancellationToken::new();
    let upstream =
        pipe(client_read, server_write, shared.clone(), stall.clone(), Some(cut.clone()));
    let downstream = pipe(server_read, client_write, shared, stall, None);
    // A reset drops both pipes, and with them the sockets (SO_LINGER 0: an RST each way).
    tokio::select! {
        _ = async { tokio::join!(upstream, downstream) } => {}
        _ = generation.cancelled() => {}
        _ = cut.cancelled() => {}
    }
}

/// Copies one direction until EOF or an error. With `cut`, watches the bytes for armed
/// patterns and cancels `cut` instead of forwarding a match.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    mut stall: watch::Receiver<bool>,
    cut: Option<CancellationToken>,
) {
    // Linger 0 on both sockets now: whichever way this connection ends abruptly (a reset, a
    // cut, the task dropped), the peers see an RST.
    let _ = from.as_ref().set_zero_linger();
    let _ = to.as_ref().set_zero_linger();
    let mut buf = vec![0u8; 64 * 1024];
    // The end of the previous chunk, so a pattern split across reads is still seen.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if *stall.borrow_and_update() {
            // A dead path: hold both sockets open and carry nothing more.
            std::future::pending::<()>().await;
        }
        if let Some(cut) = &cut {
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buf[..n]);
            let (hit, longest) = {
                let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                let hit = state.cuts.iter().position(|p| contains(&window, p));
                if let Some(index) = hit {
                    state.cuts.remove(index);
                    state.cut_count += 1;
                }
                (hit.is_some(), state.cuts.iter().map(Vec::len).max().unwrap_or(0))
            };
            if hit {
                // Never forward the matching bytes: the relay drops both sockets.
                cut.cancel();
                std::future::pending::<()>().await;
            }
            let keep = longest.saturating_sub(1).min(window.len());
            tail = window[window.len() - keep..].to_vec();
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // An orderly end on one side: pass it on as an orderly end.
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
