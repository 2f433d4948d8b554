//! The subscription index: an event only meets the subscriptions that could match it, those
//! naming its organization or none, and its entity or none. Each subscription sits in one
//! bucket per (organization, entity) it names; a filter naming neither sits in the catch-all.
//!
//! Inside a bucket, a filter with an `eq` or `in` predicate on a `data` field sits under that
//! field and the key of each value it accepts: an event meets it only when its own value at
//! that field has one of those keys. So ten thousand dashboards each watching one agent
//! (`agent.*` where `id eq …`) cost an event one lookup, not ten thousand predicate checks.

use std::collections::HashMap;
use std::sync::Arc;

use super::SubscriptionRef;
use crate::filter::predicate::data_key;
use crate::filter::{Filter, Subject};

type Filters = HashMap<SubscriptionRef, Arc<Filter>>;

/// Subscriptions that share an index key.
#[derive(Default)]
struct Bucket {
    /// Filters without an indexable predicate.
    plain: Filters,
    /// The others: by the `data` path of their first `eq`/`in` predicate, then by the key of
    /// each value it accepts.
    keyed: HashMap<Vec<String>, HashMap<String, Filters>>,
}

impl Bucket {
    fn insert(&mut self, reference: SubscriptionRef, filter: &Arc<Filter>) {
        match filter.equality_index() {
            None => {
                self.plain.insert(reference, filter.clone());
            }
            Some((path, keys)) => {
                let by_key = self.keyed.entry(path.to_vec()).or_default();
                for key in keys {
                    by_key.entry(key).or_default().insert(reference, filter.clone());
                }
            }
        }
    }

    fn remove(&mut self, reference: SubscriptionRef, filter: &Filter) {
        let Some((path, keys)) = filter.equality_index() else {
            self.plain.remove(&reference);
            return;
        };
        let Some(by_key) = self.keyed.get_mut(path) else { return };
        for key in keys {
            if let Some(filters) = by_key.get_mut(&key) {
                filters.remove(&reference);
                if filters.is_empty() {
                    by_key.remove(&key);
                }
            }
        }
        if by_key.is_empty() {
            self.keyed.remove(path);
        }
    }

    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.keyed.is_empty()
    }

    /// The filters of this bucket `subject` matches.
    fn collect(&self, subject: &Subject<'_>, out: &mut Vec<SubscriptionRef>) {
        let mut collect = |filters: &Filters| {
            for (reference, filter) in filters {
                if filter.matches(subject) {
                    out.push(*reference);
                }
            }
        };
        collect(&self.plain);
        if self.keyed.is_empty() {
            return;
        }
        // Without an envelope (or a JSON one) no predicate holds.
        let Some(envelope) = subject.envelope.and_then(|envelope| envelope.value()) else {
            return;
        };
        for (path, by_key) in &self.keyed {
            if let Some(filters) = data_key(envelope, path).and_then(|key| by_key.get(&key)) {
                collect(filters);
            }
        }
    }
}

/// Buckets by entity (`None`: the filter matches any entity).
#[derive(Default)]
struct ByEntity {
    entities: HashMap<String, Bucket>,
    any: Bucket,
}

/// Buckets by organization (`any_organization`: filters that name none).
#[derive(Default)]
pub struct Index {
    by_organization: HashMap<String, ByEntity>,
    any_organization: ByEntity,
}

impl Index {
    /// The subscriptions `subject` matches, among those its organization and entity reach.
    pub fn candidates(&self, subject: &Subject<'_>, out: &mut Vec<SubscriptionRef>) {
        let entity = subject.event_type.split_once('.').map_or(subject.event_type, |(e, _)| e);
        let mut collect = |by_entity: &ByEntity| {
            let buckets = [by_entity.entities.get(entity), Some(&by_entity.any)];
            for bucket in buckets.into_iter().flatten() {
                bucket.collect(subject, out);
            }
        };
        if let Some(organization) = subject.organization_id
            && let Some(by_entity) = self.by_organization.get(organization)
        {
            collect(by_entity);
        }
        collect(&self.any_organization);
    }

    /// Each subscription sits in one bucket per (organization, entity) it names.
    pub fn add(&mut self, reference: SubscriptionRef, filter: &Arc<Filter>) {
        let entities = filter.entities();
        let add = |by_entity: &mut ByEntity| match &entities {
            None => by_entity.any.insert(reference, filter),
            Some(entities) => {
                for entity in entities {
                    let bucket = by_entity.entities.entry((*entity).to_owned()).or_default();
                    bucket.insert(reference, filter);
                }
            }
        };
        match filter.organizations() {
            None => add(&mut self.any_organization),
            Some(organizations) => {
                for organization in organizations {
                    add(self.by_organization.entry(organization.clone()).or_default());
                }
            }
        }
    }

    pub fn remove(&mut self, reference: SubscriptionRef, filter: &Filter) {
        let entities = filter.entities();
        let remove = |by_entity: &mut ByEntity| match &entities {
            None => by_entity.any.remove(reference, filter),
            Some(entities) => {
                for entity in entities {
                    if let Some(bucket) = by_entity.entities.get_mut(*entity) {
                        bucket.remove(reference, filter);
                        if bucket.is_empty() {
                            by_entity.entities.remove(*entity);
                        }
                    }
                }
            }
        };
        match filter.organizations() {
            None => remove(&mut self.any_organization),
            Some(organizations) => {
                for organization in organizations {
                    if let Some(by_entity) = self.by_organization.get_mut(organization) {
                        remove(by_entity);
                        if by_entity.any.is_empty() && by_entity.entities.is_empty() {
                            self.by_organization.remove(organization);
                        }
                    }
                }
            }
        }
    }
}
