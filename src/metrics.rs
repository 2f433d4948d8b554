//! Counters and gauges for `/metrics` (Prometheus text format), kept by the parts that see
//! the events: the bus (appended, delivered, lag), the WebSocket writers (commit-to-send
//! latency) and the publisher (errors, capture queue). Updating one is an atomic add or a
//! short lock; nothing here allocates per event except a new event type's first count.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds (seconds) of the commit-to-send latency histogram.
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    /// Per bucket, plus one for `+Inf`.
    latency_buckets: [AtomicU64; BUCKETS.len() + 1],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    /// Items waiting between capture and the log writer.
    pub capture_queue: AtomicU64,
    /// Commit of the newest published event to its publication, in microseconds.
    source_lag_micros: AtomicU64,
}

#[derive(Default)]
struct Counters {
    appended: BTreeMap<String, u64>,
    delivered: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
}

/// Gauges read when scraped.
pub struct Snapshot {
    pub connections: usize,
    pub subscriptions: usize,
    pub slow_consumer_closes: u64,
    pub outbound_frames: usize,
    pub slot_lag_bytes: Option<i64>,
    pub source: &'static str,
}

impl Metrics {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events appended to the log (their types), each with how many connections it was
    /// queued for; one lock for the whole batch.
    pub fn published<'a>(&self, events: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut counters = self.counters();
        for (kind, connections) in events {
            bump(&mut counters.appended, kind, 1);
            if connections > 0 {
                bump(&mut counters.delivered, kind, connections);
            }
        }
    }

    /// A pipeline error, by kind (`decode`, `replication`, `log`, ...).
    pub fn error(&self, kind: &'static str) {
        *self.counters().errors.entry(kind).or_default() += 1;
    }

    /// A live event written to a client `micros` after its commit.
    pub fn sent(&self, micros: i64) {
        let micros = micros.max(0) as u64;
        let seconds = micros as f64 / 1e6;
        let bucket = BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn source_lag(&self, micros: i64) {
        self.source_lag_micros.store(micros.max(0) as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let counters = self.counters();
        family(
            &mut out,
            "rowcast_events_appended_total",
            "counter",
            "Events appended to the log, by type.",
        );
        for (kind, n) in &counters.appended {
            let _ = writeln!(out, "rowcast_events_appended_total{{type=\"{}\"}} {n}", escape(kind));
        }
        family(
            &mut out,
            "rowcast_events_delivered_total",
            "counter",
            "Event frames queued to WebSocket connections, by type.",
        );
        for (kind, n) in &counters.delivered {
            let _ =
                writeln!(out, "rowcast_events_delivered_total{{type=\"{}\"}} {n}", escape(kind));
        }
        family(
            &mut out,
            "rowcast_errors_total",
            "counter",
            "Capture pipeline errors, by kind (decode errors stop the publisher).",
        );
        for kind in ["decode", "protocol", "replication", "catalog", "log", "setup", "triggers"] {
            let n = counters.errors.get(kind).copied().unwrap_or(0);
            let _ = writeln!(out, "rowcast_errors_total{{kind=\"{kind}\"}} {n}");
        }
        drop(counters);
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            &mut out,
            "rowcast_connections",
            "Open WebSocket connections.",
            gauges.connections.to_string(),
        );
        gauge(
            &mut out,
            "rowcast_subscriptions",
            "Subscriptions across connections.",
            gauges.subscriptions.to_string(),
        );
        family(
            &mut out,
            "rowcast_slow_consumer_closes_total",
            "counter",
            "Connections closed with 4008.",
        );
        let _ = writeln!(out, "rowcast_slow_consumer_closes_total {}", gauges.slow_consumer_closes);
        gauge(
            &mut out,
            "rowcast_outbound_queue_frames",
            "Frames queued for WebSocket clients, all connections.",
            gauges.outbound_frames.to_string(),
        );
        gauge(
            &mut out,
            "rowcast_capture_queue_items",
            "Items waiting between capture and the log writer.",
            self.capture_queue.load(Ordering::Relaxed).to_string(),
        );
        if let Some(lag) = gauges.slot_lag_bytes {
            gauge(
                &mut out,
                "rowcast_source_lag_bytes",
                "WAL between the server's position and the slot's confirmed position.",
                lag.to_string(),
            );
        }
        let lag = self.source_lag_micros.load(Ordering::Relaxed) as f64 / 1e6;
        gauge(
            &mut out,
            "rowcast_source_lag_seconds",
            "Commit of the newest event to its publication.",
            format!("{lag}"),
        );
        family(&mut out, "rowcast_source_info", "gauge", "The capture source in use.");
        let _ = writeln!(out, "rowcast_source_info{{source=\"{}\"}} 1", gauges.source);
        family(
            &mut out,
            "rowcast_commit_to_send_seconds",
            "histogram",
            "Source commit to the event's frame being written to a client (live events).",
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "rowcast_commit_to_send_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.latency_buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "rowcast_commit_to_send_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "rowcast_commit_to_send_seconds_sum {sum}");
        let _ = writeln!(
            out,
            "rowcast_commit_to_send_seconds_count {}",
            self.latency_count.load(Ordering::Relaxed)
        );
        out
    }
}

fn bump(map: &mut BTreeMap<String, u64>, kind: &str, n: u64) {
    match map.get_mut(kind) {
        Some(count) => *count += n,
        None => {
            map.insert(kind.to_owned(), n);
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The window `events_per_second` is averaged over.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Events per second over the last `RATE_WINDOW`, from samples of the log head.
pub struct Rate {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Rate {
    pub fn new(head: u64) -> Self {
        Self { samples: Mutex::new(VecDeque::from([(Instant::now(), head)])) }
    }

    pub fn sample(&self, head: u64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        samples.push_back((now, head));
        while samples.len() > 2 && samples.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
            samples.pop_front();
        }
    }

    pub fn per_second(&self) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        match (samples.front(), samples.back()) {
            (Some((t0, h0)), Some((t1, h1))) if t1 > t0 => {
                let rate = (h1 - h0) as f64 / (*t1 - *t0).as_secs_f64();
                (rate * 10.0).round() / 10.0
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.published([("agent.created", 3), ("agent.created", 0), ("we\"ird", 1)]);
        metrics.error("decode");
        metrics.sent(800);
        metrics.sent(30_000);
        metrics.sent(60_000_000);
        let text = metrics.render(&Snapshot {
            connections: 2,
            subscriptions: 5,
            slow_consumer_closes: 1,
            outbound_frames: 7,
            slot_lag_bytes: Some(128),
            source: "replication",
        });
        for line in [
            "rowcast_events_appended_total{type=\"agent.created\"} 2",
            "rowcast_events_delivered_total{type=\"agent.created\"} 3",
            "rowcast_events_appended_total{type=\"we\\\"ird\"} 1",
            "rowcast_errors_total{kind=\"decode\"} 1",
            "rowcast_connections 2",
            "rowcast_source_lag_bytes 128",
            "rowcast_commit_to_send_seconds_bucket{le=\"0.001\"} 1",
            "rowcast_commit_to_send_seconds_bucket{le=\"0.05\"} 2",
            "rowcast_commit_to_send_seconds_bucket{le=\"10\"} 2",
            "rowcast_commit_to_send_seconds_bucket{le=\"+Inf\"} 3",
            "rowcast_commit_to_send_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
