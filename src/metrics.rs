//! Counters and gauges for `/metrics`, kept by the parts that see the events: the bus
//! (appended, delivered, source lag, connections falling behind), the WebSocket writers (commit-to-send latency) and the
//! publisher (errors, capture queue). prometheus-client keeps and encodes them, in the
//! Prometheus text format (0.0.4), whose `le` labels and names (`_total` added to counters)
//! are the ones rowcast has always served.
//!
//! Updating one is an atomic add or a short lock; nothing here allocates per event except a
//! new event type's first count.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::model::Timestamp;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the commit-to-stage latency histograms: fine below 10 ms, where
/// a healthy pipeline is, so that a quantile can be read to a quarter of a millisecond.
const BUCKETS: [f64; 20] = [
    0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The stages of `rowcast_pipeline_seconds`, in the order an event captured by replication
/// passes them.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// The log writer took the event from capture.
    Received,
    /// Its append was sent to the log.
    SentToLog,
    /// Its append committed; it is published on the bus at once.
    Appended,
}

impl Stage {
    /// In declaration order: `stage as usize` is its place here.
    const ALL: [Stage; 3] = [Stage::Received, Stage::SentToLog, Stage::Appended];

    fn name(self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::SentToLog => "sent_to_log",
            Stage::Appended => "appended",
        }
    }
}

type StageLabel = [(&'static str, &'static str); 1];

/// The `kind` values of `rowcast_errors_total`, shown at 0 before the first error.
const ERROR_KINDS: [&str; 8] =
    ["decode", "protocol", "replication", "catalog", "log", "setup", "triggers", "continuity"];

type TypeLabel = [(&'static str, String); 1];
type KindLabel = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    appended: Family<TypeLabel, Counter>,
    delivered: Family<TypeLabel, Counter>,
    /// The two counters of each event type seen, so counting a known type neither builds a
    /// label set nor looks one up in a family.
    by_type: Mutex<HashMap<Box<str>, TypeCounters>>,
    errors: Family<KindLabel, Counter>,
    latency: Histogram,
    /// `rowcast_pipeline_seconds`, one histogram per stage, in [`Stage::ALL`] order.
    stages: [Histogram; 3],
    capture_queue: Gauge,
    source_lag: Gauge<f64, AtomicU64>,
    continuity_broken: Gauge,
    fell_behind: Counter,
}

struct TypeCounters {
    appended: Counter,
    /// Created at the first delivery, as a type nobody subscribes to has no delivered series.
    delivered: Option<Counter>,
}

/// Gauges read when scraped.
pub struct Snapshot {
    pub connections: usize,
    pub subscriptions: usize,
    pub slow_consumer_closes: u64,
    pub outbound_frames: usize,
    pub slot_lag_bytes: Option<i64>,
    pub source: &'static str,
    /// The role of this process (`all`, `publisher`, `gateway`).
    pub role: &'static str,
    /// The JetStream side, for publishers and gateways.
    pub nats: Option<Nats>,
}

/// What a publisher's relay or a gateway's consumer counted (see `nats::Status`).
#[derive(Debug, Clone, Default)]
pub struct Nats {
    pub connected: bool,
    pub errors: u64,
    pub published: u64,
    pub received: u64,
    pub pending: u64,
    pub lag_seconds: f64,
    pub gaps: u64,
    pub filled: u64,
    pub malformed: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let (appended, delivered) = (Family::default(), Family::default());
        let errors = Family::<KindLabel, Counter>::default();
        for kind in ERROR_KINDS {
            // Shown at 0 from the start, so a first error is an increase, not a new series.
            let _ = errors.get_or_create(&[("kind", kind)]);
        }
        let latency = Histogram::new(BUCKETS);
        let stages =
            Family::<StageLabel, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(BUCKETS)
            });
        let stage_histograms =
            Stage::ALL.map(|stage| stages.get_or_create(&[("stage", stage.name())]).clone());
        let (capture_queue, source_lag) = (Gauge::default(), Gauge::default());
        let continuity_broken = Gauge::default();
        let fell_behind = Counter::default();
        let mut registry = Registry::default();
        // Counters are registered without `_total`: the encoder adds it.
        registry.register(
            "rowcast_events_appended",
            "Events appended to the log, by type",
            Family::clone(&appended),
        );
        registry.register(
            "rowcast_events_delivered",
            "Event frames queued to WebSocket connections, by type",
            Family::clone(&delivered),
        );
        registry.register(
            "rowcast_errors",
            "Capture pipeline errors, by kind (decode errors stop the publisher)",
            errors.clone(),
        );
        registry.register(
            "rowcast_capture_queue_items",
            "Items waiting between capture and the log writer",
            Gauge::clone(&capture_queue),
        );
        registry.register(
            "rowcast_source_lag_seconds",
            "Commit of the newest event to its publication",
            Gauge::clone(&source_lag),
        );
        registry.register(
            "rowcast_continuity_broken",
            "1 while capture waits for an operator: continuity with the log cannot be proven",
            Gauge::clone(&continuity_broken),
        );
        registry.register(
            "rowcast_lagging_switches",
            "Connections that fell behind and were switched to catching up from the log",
            fell_behind.clone(),
        );
        registry.register(
            "rowcast_commit_to_send_seconds",
            "Source commit to the event's frame being written to a client (live events)",
            latency.clone(),
        );
        registry.register(
            "rowcast_pipeline_seconds",
            "Source commit to each stage of the replication pipeline, per event: received by the log writer, its append sent to the log, appended (and published)",
            stages.clone(),
        );
        Self {
            registry,
            appended,
            delivered,
            by_type: Mutex::default(),
            errors,
            latency,
            stages: stage_histograms,
            capture_queue,
            source_lag,
            continuity_broken,
            fell_behind,
        }
    }
}

impl Metrics {
    /// Events appended to the log (their types), each with how many connections it was
    /// queued for; one lock for the whole batch.
    pub fn published<'a>(&self, events: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut by_type = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, connections) in events {
            if !by_type.contains_key(kind) {
                let appended = self.appended.get_or_create_owned(&type_label(kind));
                by_type.insert(kind.into(), TypeCounters { appended, delivered: None });
            }
            let Some(counters) = by_type.get_mut(kind) else { continue };
            counters.appended.inc();
            if connections > 0 {
                counters
                    .delivered
                    .get_or_insert_with(|| self.delivered.get_or_create_owned(&type_label(kind)))
                    .inc_by(connections);
            }
        }
    }

    /// A pipeline error, by kind (`decode`, `replication`, `log`, ...).
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&[("kind", kind)]).inc();
    }

    /// A live event written to a client `micros` after its commit.
    pub fn sent(&self, micros: i64) {
        self.latency.observe(micros.max(0) as f64 / 1e6);
    }

    /// Events that reached `stage`, each timed from its source commit.
    pub fn stage<'a>(&self, stage: Stage, commits: impl IntoIterator<Item = &'a Timestamp>) {
        let histogram = &self.stages[stage as usize];
        let now = Timestamp::now().0;
        for commit in commits {
            histogram.observe((now - commit.0).max(0) as f64 / 1e6);
        }
    }

    /// A connection fell behind: the bus switched it to catching up from the log.
    pub fn fell_behind(&self) {
        self.fell_behind.inc();
    }

    pub fn source_lag(&self, micros: i64) {
        self.source_lag.set(micros.max(0) as f64 / 1e6);
    }

    /// Items waiting between capture and the log writer.
    pub fn capture_queue(&self, items: usize) {
        self.capture_queue.set(i64::try_from(items).unwrap_or(i64::MAX));
    }

    /// Whether capture is stopped on a broken continuity, waiting for an operator.
    pub fn continuity_broken(&self, broken: bool) {
        self.continuity_broken.set(i64::from(broken));
    }

    /// The Prometheus text exposition ([`CONTENT_TYPE`]).
    pub fn render(&self, gauges: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        // What the caller read for this scrape: a registry of constants, encoded after ours.
        let mut scraped = Registry::default();
        let count = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        scraped.register(
            "rowcast_connections",
            "Open WebSocket connections",
            count(gauges.connections),
        );
        scraped.register(
            "rowcast_subscriptions",
            "Subscriptions across connections",
            count(gauges.subscriptions),
        );
        scraped.register(
            "rowcast_slow_consumer_closes",
            "Connections closed with 4008",
            ConstCounter::new(gauges.slow_consumer_closes),
        );
        scraped.register(
            "rowcast_outbound_queue_frames",
            "Frames queued for WebSocket clients, all connections",
            count(gauges.outbound_frames),
        );
        if let Some(lag) = gauges.slot_lag_bytes {
            scraped.register(
                "rowcast_source_lag_bytes",
                "WAL between the server's position and the slot's confirmed position",
                ConstGauge::new(lag),
            );
        }
        // Registered as `rowcast_source`: the encoder names info metrics `_info`.
        scraped.register(
            "rowcast_source",
            "The capture source in use",
            Info::new([("source", gauges.source)]),
        );
        scraped.register(
            "rowcast_role",
            "What this process does",
            Info::new([("role", gauges.role)]),
        );
        if let Some(nats) = &gauges.nats {
            let counter = ConstCounter::new;
            scraped.register(
                "rowcast_nats_connected",
                "1 while connected to a NATS server",
                ConstGauge::new(i64::from(nats.connected)),
            );
            scraped.register(
                "rowcast_nats_errors",
                "Failures publishing to or consuming the stream (each retried)",
                counter(nats.errors),
            );
            scraped.register(
                "rowcast_nats_published",
                "Events the stream acknowledged (publisher)",
                counter(nats.published),
            );
            scraped.register(
                "rowcast_nats_received",
                "Messages taken from the stream (gateway)",
                counter(nats.received),
            );
            scraped.register(
                "rowcast_nats_stream_pending_messages",
                "Messages the stream holds that this gateway has not taken yet",
                ConstGauge::new(i64::try_from(nats.pending).unwrap_or(i64::MAX)),
            );
            scraped.register(
                "rowcast_nats_stream_lag_seconds",
                "How long ago the stream stored the last message taken, while it holds more (gateway)",
                ConstGauge::<f64>::new(nats.lag_seconds),
            );
            scraped.register(
                "rowcast_nats_gaps",
                "Id gaps in the stream that this gateway filled from the log",
                counter(nats.gaps),
            );
            scraped.register(
                "rowcast_nats_gap_events",
                "Events read from the log to fill gaps (gateway)",
                counter(nats.filled),
            );
            scraped.register(
                "rowcast_nats_malformed",
                "Stream messages that were not events, skipped (their ids come from the log)",
                counter(nats.malformed),
            );
        }
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_text::encode(&mut out, &scraped);
        out
    }
}

fn type_label(kind: &str) -> TypeLabel {
    [("type", kind.to_owned())]
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
        metrics.capture_queue(4);
        metrics.fell_behind();
        let commit = Timestamp::now();
        metrics.stage(Stage::SentToLog, [&commit, &commit]);
        metrics.stage(Stage::Appended, [&commit]);
        let text = metrics.render(&Snapshot {
            connections: 2,
            subscriptions: 5,
            slow_consumer_closes: 1,
            outbound_frames: 7,
            slot_lag_bytes: Some(128),
            source: "replication",
            role: "gateway",
            nats: Some(Nats {
                connected: true,
                pending: 3,
                lag_seconds: 0.5,
                gaps: 2,
                ..Default::default()
            }),
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
            // Each stage under its own label.
            "rowcast_pipeline_seconds_count{stage=\"received\"} 0",
            "rowcast_pipeline_seconds_count{stage=\"sent_to_log\"} 2",
            "rowcast_pipeline_seconds_count{stage=\"appended\"} 1",
            "# TYPE rowcast_commit_to_send_seconds histogram",
            "rowcast_errors_total{kind=\"log\"} 0",
            "rowcast_slow_consumer_closes_total 1",
            "rowcast_capture_queue_items 4",
            "rowcast_lagging_switches_total 1",
            "rowcast_source_info{source=\"replication\"} 1",
            "rowcast_role_info{role=\"gateway\"} 1",
            "rowcast_nats_connected 1",
            "rowcast_nats_stream_pending_messages 3",
            "rowcast_nats_stream_lag_seconds 0.5",
            "rowcast_nats_gaps_total 2",
            "rowcast_nats_gap_events_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("_total_total") && !text.contains("# EOF"), "{text}");
        let quiet = Metrics::default();
        quiet.published([("user.created", 0)]);
        let text = quiet.render(&Snapshot {
            connections: 0,
            subscriptions: 0,
            slow_consumer_closes: 0,
            outbound_frames: 0,
            slot_lag_bytes: None,
            source: "triggers",
            role: "all",
            nats: None,
        });
        assert!(text.contains("rowcast_events_appended_total{type=\"user.created\"} 1\n"));
        assert!(!text.contains("rowcast_events_delivered_total{"), "{text}");
        assert!(!text.contains("rowcast_source_lag_bytes"), "{text}");
        assert!(!text.contains("rowcast_nats_"), "{text}");
    }
}
