//! One life of the trigger source: drain the outbox into the log until shutdown.

use tokio_util::sync::CancellationToken;

use super::{PublisherError, Signals, State, open_log};
use crate::capture::catalog::Catalog;
use crate::capture::triggers::{self, TriggerSettings};
use crate::config::Settings;
use crate::log::StoredEvent;
use crate::setup;

/// One life of the trigger source: drains the outbox until shutdown or the first error.
pub(super) async fn pipeline(
    settings: &Settings,
    signals: &Signals,
    shutdown: &CancellationToken,
) -> Result<(), PublisherError> {
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        opened = async {
            let writer = open_log(settings, signals, "triggers").await?;
            let catalog = super::catalog(settings).await?;
            setup::check_mapping(&catalog, &settings.mapping).await?;
            warn_of_a_slot(&catalog, &settings.slot).await;
            Ok::<_, PublisherError>(writer)
        } => opened?,
    };
    let mut writer = opened;
    let trigger_settings = TriggerSettings {
        source: settings.database.clone(),
        batch_size: settings.batch_size,
        poll_interval: settings.poll_interval,
    };
    let appended = |stored: &[StoredEvent]| signals.appended(stored);
    let ready = || {
        tracing::info!(last_id = *signals.head.borrow(), "draining the trigger outbox");
        signals.state.send_replace(State::Streaming);
    };
    let mut inbox = match &signals.inbox {
        Some(inbox) => Some(inbox.lock().await),
        None => None,
    };
    triggers::run(
        &mut writer,
        inbox.as_deref_mut(),
        &settings.mapping,
        &trigger_settings,
        appended,
        ready,
        shutdown,
    )
    .await?;
    tracing::info!("trigger capture stopped");
    Ok(())
}

/// A slot of rowcast's name left behind holds WAL that nobody will read: say so, with the fix.
async fn warn_of_a_slot(catalog: &Catalog, slot: &str) {
    let held = catalog
        .client()
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    if let Ok(Some(row)) = held {
        let bytes: Option<i64> = row.get(0);
        tracing::warn!(
            slot,
            wal_bytes_held = bytes.unwrap_or(0),
            "a replication slot of this name exists but capture uses triggers: it holds WAL nobody reads; \
             drop it with SELECT pg_drop_replication_slot('{slot}') unless something else uses it"
        );
    }
}
