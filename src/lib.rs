//! rowcast: committed Postgres row changes become typed events in a durable log, pushed to
//! subscribers over WebSocket.
//!
//! ```text
//! Postgres --(slot, pgoutput)--> capture --> decode/map --> event log --> bus --> WebSocket / REST
//!          --(triggers+NOTIFY)-->   ^ same events, from either source
//! ```
//!
//! The data flow, folder by folder (docs/architecture.md has what each may import):
//!
//! 1. [`capture`] gets committed changes out of Postgres: [`capture::replication`] speaks the
//!    streaming replication protocol (a logical slot with `pgoutput`, in a session pinned to
//!    UTC/ISO output), [`capture::pgoutput`] decodes its messages, [`capture::stream`] keeps the
//!    relation cache and renders rows with [`capture::render`] (exactly `to_jsonb(row)` in a UTC
//!    session). [`capture::triggers`] is the fallback: it drains the outbox row triggers fill.
//! 2. [`mapping`] turns each change into typed `<entity>.<action>` events ([`model::Event`]);
//!    it also declares application event types, which applications publish from SQL
//!    (`rowcast.emit()`, captured like a change) or over HTTP (`POST /api/events`, appended by
//!    the log's single writer).
//! 3. [`log`] appends events in batches, each with its source cursor, in one transaction.
//! 4. [`publisher`] supervises capture into the log, reconnects on transient failures (the one
//!    rule is [`pg::transience`]), and hands each committed batch to the [`bus`], which matches
//!    it against subscriptions ([`filter`]) by index into per-connection mailboxes.
//! 5. [`nats`] takes the pipeline beyond one machine (`--role publisher|gateway`): a publisher
//!    hands its committed batches to a JetStream stream instead of a bus, and gateways feed
//!    their bus from the stream, filling any id gap from the log.
//! 6. [`ws`] serves `GET /ws/events` (sessions, catch-up from the log), [`pgwire`] the same
//!    events to Postgres drivers (`--pg-listen`: `SELECT` history, `COPY (SUBSCRIBE ...)`);
//!    [`http`] the state they share, access control, history, metadata, stats and health; [`server`] wires it all and
//!    shuts it down in order. [`apps`] holds the demo, `tail` and throwaway clusters.
//!
//! Guarantees: every committed change on a mapped table becomes its events exactly once, in
//! commit order, with strictly increasing ids; the slot is acknowledged only up to changes
//! whose events are committed in the log; an idle source does not make the slot hold WAL; a
//! subscriber gets every matching event after its `subscribed.last_id` (or its `since`) once,
//! in order.

pub mod apps;
pub mod auth;
pub mod backoff;
pub mod bus;
pub mod capture;
pub mod config;
pub mod filter;
pub mod http;
pub mod log;
pub mod mapping;
pub mod metrics;
pub mod model;
pub mod nats;
pub mod pg;
pub mod pgwire;
pub mod publisher;
pub mod server;
pub mod setup;
pub mod ws;
