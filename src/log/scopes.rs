//! The organizations and domains the log's events carry, for metadata: loaded once at start,
//! then kept current from every append.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use tokio_postgres::Client;

use super::{LogError, StoredEvent};

/// Organizations with the domains seen with them.
#[derive(Default)]
pub struct Scopes {
    known: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Scopes {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes the scopes of appended events; one lock per batch, no allocation for known ones.
    pub fn note(&self, events: &[StoredEvent]) {
        let mut known = self.lock();
        for event in events {
            let Some(organization) = &event.organization_id else { continue };
            let seen = known.get(organization).is_some_and(|domains| {
                event.domain_id.as_ref().is_none_or(|domain| domains.contains(domain))
            });
            if !seen {
                let domains = known.entry(organization.clone()).or_default();
                domains.extend(event.domain_id.clone());
            }
        }
    }

    /// Adds scopes found in the log.
    pub fn add(&self, scopes: impl IntoIterator<Item = (String, Option<String>)>) {
        let mut known = self.lock();
        for (organization, domain) in scopes {
            known.entry(organization).or_default().extend(domain);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.lock().clone()
    }
}

/// The organizations and domains of the events the log holds now.
pub async fn load_scopes(client: &Client) -> Result<Vec<(String, Option<String>)>, LogError> {
    let rows = client
        .query(
            "SELECT DISTINCT organization_id, domain_id FROM rowcast.events
              WHERE organization_id IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
}
