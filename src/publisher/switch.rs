//! Which capture source feeds the log, and changing it without losing or repeating a change.
//!
//! The source is decided once and recorded in the log (`rowcast.capture`): `--source auto`
//! probes the server only the first time, so a role that later gains REPLICATION does not
//! silently move capture elsewhere. A different `--source` than the recorded one is a switch,
//! carried out before serving:
//!
//! ```text
//! triggers -> replication: slot created (C) ─ T: drop triggers + marker ─ drain the outbox
//!                           replication starts at C and skips to T's marker
//! replication -> triggers:  T: create triggers + marker ─ drain the slot up to T's marker
//!                           ─ drop the slot; the outbox holds exactly what came after T
//! ```
//!
//! T is one transaction that changes the triggers and emits a transactional logical message
//! carrying the switch's token. Creating or dropping a trigger locks its table against writers,
//! so every transaction on a mapped table commits either before T (seen by the old source) or
//! after it (seen by the new one), and the marker says exactly where T is in the WAL. The token
//! is recorded before T, so an interrupted switch resumes at the same marker.

use std::time::Duration;

use rand::Rng;

use super::replication::{self, observe, source_name};
use super::{PublisherError, Signals};
use crate::capture::catalog::Catalog;
use crate::capture::replication::{ConnectParams, ReplicationClient};
use crate::capture::stream::{CaptureError, SWITCH_PREFIX};
use crate::capture::triggers;
use crate::config::{Settings, SourceMode};
use crate::log::{self, LogError, LogWriter};
use crate::pg::{format_lsn, quote_literal};
use crate::setup::{self, SetupError};

/// The source to capture with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub source: SourceMode,
    pub reason: String,
    /// The recorded source, when it differs: a switch must run before serving.
    pub switch_from: Option<SourceMode>,
    /// Whether the decision is already recorded in the log.
    pub recorded: bool,
}

fn mode_name(mode: SourceMode) -> &'static str {
    mode.name()
}

fn parse_mode(name: &str) -> Option<SourceMode> {
    match name {
        "replication" => Some(SourceMode::Replication),
        "triggers" => Some(SourceMode::Triggers),
        _ => None,
    }
}

/// What `requested` (`auto` or explicit) means against what the log recorded.
pub async fn decide(
    settings: &Settings,
    requested: SourceMode,
) -> Result<Decision, PublisherError> {
    let log = crate::pg::connect(&settings.log, "log").await.map_err(LogError::from)?;
    let recorded = log::recorded_capture(&log).await?;
    if let Some(pending) = recorded.as_ref().and_then(|r| r.switch_marker.as_ref())
        && requested != SourceMode::Triggers
    {
        return Err(PublisherError::Switch(format!(
            "a switch to trigger capture was interrupted (marker {pending}); finish it with --source triggers"
        )));
    }
    let recorded_mode = recorded.as_ref().and_then(|r| parse_mode(&r.source));
    Ok(match (requested, recorded_mode, recorded) {
        (SourceMode::Auto, Some(mode), Some(r)) => Decision {
            source: mode,
            reason: format!(
                "recorded {} ({})",
                r.decided_at,
                r.reason.unwrap_or_else(|| "no reason given".into())
            ),
            switch_from: None,
            recorded: true,
        },
        (SourceMode::Auto, _, _) => {
            let client =
                crate::pg::connect(&settings.database, "probe").await.map_err(SetupError::from)?;
            let (source, reason) = setup::choose_source(&client).await?;
            Decision { source, reason, switch_from: None, recorded: false }
        }
        (source, Some(mode), _) if mode == source => Decision {
            source,
            reason: "chosen with --source".into(),
            switch_from: None,
            recorded: true,
        },
        (source, Some(from), _) => Decision {
            source,
            reason: format!("switched from {} with --source", mode_name(from)),
            switch_from: Some(from),
            recorded: false,
        },
        (source, None, _) => Decision {
            source,
            reason: "chosen with --source".into(),
            switch_from: None,
            recorded: false,
        },
    })
}

/// Records a decision in the log (after `setup` installed the log's schema).
pub async fn record(settings: &Settings, decision: &Decision) -> Result<(), PublisherError> {
    let log = crate::pg::connect(&settings.log, "log").await.map_err(LogError::from)?;
    log::record_capture(&log, mode_name(decision.source), &decision.reason).await?;
    Ok(())
}

/// Switches from the recorded source `from` to `settings.source`, draining `from` first and
/// removing what it left (triggers and outbox, or the slot), then records the new source.
/// Returns how many events the old source still had for the log.
pub async fn switch(settings: &Settings, from: SourceMode) -> Result<usize, PublisherError> {
    let to = settings.source;
    tracing::warn!(from = mode_name(from), to = mode_name(to), "switching the capture source");
    let drained = match (from, to) {
        (SourceMode::Triggers, SourceMode::Replication | SourceMode::Auto) => {
            to_replication(settings).await?
        }
        (SourceMode::Replication | SourceMode::Auto, SourceMode::Triggers) => {
            to_triggers(settings).await?
        }
        _ => 0,
    };
    let log = crate::pg::connect(&settings.log, "log").await.map_err(LogError::from)?;
    let reason = format!("switched from {} with --source", mode_name(from));
    log::record_capture(&log, mode_name(to), &reason).await?;
    tracing::warn!(
        from = mode_name(from),
        to = mode_name(to),
        drained,
        "capture source switched: the old source was drained and removed"
    );
    Ok(drained)
}

fn new_token() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Triggers to replication: a fresh slot, then T drops the triggers and marks the WAL, then
/// the outbox is drained; replication skips to the marker.
async fn to_replication(settings: &Settings) -> Result<usize, PublisherError> {
    setup::setup_replication(settings).await?;
    let params = ConnectParams::from_target(&settings.database, settings.max_message_bytes);
    let mut writer = LogWriter::open(&settings.log, &source_name(&settings.slot)).await?;
    let catalog = super::catalog(settings).await?;
    let mut client = ReplicationClient::connect(&params).await.map_err(CaptureError::from)?;
    let token = match writer.skip_until_marker() {
        // Resumed: the slot made for this switch already holds everything after its start.
        Some(token) => token.to_owned(),
        None => {
            // A slot left from before the triggers' time starts too early: it would repeat
            // what the triggers captured. Capture starts at a slot made now.
            drop_slot(&catalog, &settings.slot).await?;
            client.create_slot(&settings.slot).await.map_err(CaptureError::from)?;
            let observed = observe(&mut client, &catalog, &settings.slot).await?;
            let start = observed.slot.flatten().unwrap_or(observed.wal_end);
            let token = new_token();
            writer.begin_handover(start, &observed.system_identifier, &token).await?;
            tracing::info!(slot = %settings.slot, start = %format_lsn(start), "created the replication slot for the switch");
            token
        }
    };
    drop(writer);
    let triggers = setup::drop_capture_triggers_sql(&settings.mapping);
    let route = setup::EmitRoute::Replication;
    switching_transaction(&catalog, settings, "ACCESS EXCLUSIVE", &triggers, route, &token).await?;
    // Everything the triggers captured, before T, goes into the log now.
    let mut writer = LogWriter::open(&settings.log, "triggers").await?;
    let drained = triggers::drain_all(&mut writer, &settings.mapping, settings.batch_size)
        .await
        .map_err(PublisherError::from)?;
    drop(writer);
    setup::uninstall_triggers(&settings.database).await?;
    Ok(drained)
}

/// Replication to triggers: T installs the triggers and marks the WAL, the slot is drained up
/// to the marker, then dropped.
async fn to_triggers(settings: &Settings) -> Result<usize, PublisherError> {
    let catalog = setup::prepare_triggers(settings).await?;
    let log = crate::pg::connect(&settings.log, "log").await.map_err(LogError::from)?;
    let recorded = log::recorded_capture(&log).await?;
    let token = match recorded.and_then(|r| r.switch_marker) {
        Some(token) => token,
        None => {
            let token = new_token();
            log::record_switch_marker(&log, &token).await?;
            token
        }
    };
    let triggers = setup::capture_triggers_sql(&settings.mapping);
    let route = setup::EmitRoute::Triggers;
    switching_transaction(&catalog, settings, "SHARE ROW EXCLUSIVE", &triggers, route, &token)
        .await?;
    // Everything before T is the slot's to deliver: drain it up to the marker.
    let params = ConnectParams::from_target(&settings.database, settings.max_message_bytes);
    let signals = Signals::detached();
    let never = tokio_util::sync::CancellationToken::new();
    let head = log::head(&log).await?;
    replication::pipeline(settings, &params, &signals, &never, Some(&token)).await.map_err(
        |err| match err {
            PublisherError::Continuity(broken) => PublisherError::Switch(format!(
                "the replication slot cannot be drained before switching to triggers: {}",
                broken.reason
            )),
            other => other,
        },
    )?;
    let drained = log::head(&log).await?.saturating_sub(head) as usize;
    drop_slot(&catalog, &settings.slot).await?;
    catalog
        .client()
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            crate::pg::quote_ident(&settings.publication)
        ))
        .await
        .map_err(SetupError::from)?;
    Ok(drained)
}

/// How long the switching transaction keeps trying to lock the mapped tables.
const LOCK_PATIENCE: Duration = Duration::from_secs(60);
/// The pause between two attempts at the locks, in milliseconds (random, so that a retry does
/// not fall into step with the application's writes).
const LOCK_RETRY_MS: std::ops::Range<u64> = 10..60;
/// How long a walsender that is letting go of the slot is waited for, and how often it is
/// checked.
const SLOT_RELEASE_PATIENCE: Duration = Duration::from_secs(10);
const SLOT_POLL: Duration = Duration::from_millis(100);

/// T: locks every mapped table at once or not at all (`NOWAIT`: holding some while waiting
/// for others could deadlock with the application, and Postgres might pick the application's
/// transaction to abort), changes the triggers, and emits the marker, in one transaction.
/// `rowcast.emit()`'s route changes in it too: every emitting transaction holds a share lock
/// on the route until it ends, so the EXCLUSIVE lock here waits for none of them either.
async fn switching_transaction(
    catalog: &Catalog,
    settings: &Settings,
    lock_mode: &str,
    triggers: &str,
    route: setup::EmitRoute,
    token: &str,
) -> Result<(), PublisherError> {
    let tables: Vec<String> = settings.mapping.entities().iter().map(|e| e.table.sql()).collect();
    let t = format!(
        "BEGIN;
         LOCK TABLE {} IN {lock_mode} MODE NOWAIT;
         LOCK TABLE rowcast.emit_route IN EXCLUSIVE MODE NOWAIT;
         {triggers}
         UPDATE rowcast.emit_route SET via = {};
         SELECT pg_logical_emit_message(true, {}, {});
         COMMIT;",
        tables.join(", "),
        quote_literal(route.as_str()),
        quote_literal(SWITCH_PREFIX),
        quote_literal(token)
    );
    let deadline = tokio::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match catalog.client().batch_execute(&t).await {
            Ok(()) => return Ok(()),
            Err(err) if err.code().is_some_and(|c| c.code() == "55P03") => {
                let _ = catalog.client().batch_execute("ROLLBACK").await;
                if tokio::time::Instant::now() > deadline {
                    return Err(PublisherError::Switch(format!(
                        "the mapped tables were never free at once for {LOCK_PATIENCE:?}; try again when writes are quieter"
                    )));
                }
                let pause = rand::rng().random_range(LOCK_RETRY_MS);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Err(err) => {
                let _ = catalog.client().batch_execute("ROLLBACK").await;
                return Err(SetupError::from(err).into());
            }
        }
    }
}

/// Drops the slot if it exists, waiting for a walsender that is still letting go of it.
async fn drop_slot(catalog: &Catalog, slot: &str) -> Result<(), PublisherError> {
    let deadline = tokio::time::Instant::now() + SLOT_RELEASE_PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let dropped = catalog
            .client()
            .query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await
            .map_err(SetupError::from)?;
        let left = catalog
            .client()
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .map_err(SetupError::from)?;
        if left.is_none() {
            if !dropped.is_empty() {
                tracing::info!(slot, "dropped the replication slot");
            }
            return Ok(());
        }
        tokio::time::sleep(SLOT_POLL).await;
    }
    Err(PublisherError::Switch(format!(
        "replication slot {slot:?} stays active: stop the rowcast that streams from it first"
    )))
}
