//! The subscription index: an event only meets the subscriptions that could match it, those
//! naming its organization or none, and its entity or none. Each subscription sits in one
//! bucket per (organization, entity) it names; a filter naming neither sits in the catch-all.

use std::collections::HashMap;
use std::sync::Arc;

use super::SubscriptionRef;
use crate::filter::{Filter, Subject};

/// Subscriptions that share an index key.
type Bucket = HashMap<SubscriptionRef, Arc<Filter>>;

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
                for (reference, filter) in bucket {
                    if filter.matches(subject) {
                        out.push(*reference);
                    }
                }
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
            None => {
                by_entity.any.insert(reference, filter.clone());
            }
            Some(entities) => {
                for entity in entities {
                    let bucket = by_entity.entities.entry((*entity).to_owned()).or_default();
                    bucket.insert(reference, filter.clone());
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
            None => {
                by_entity.any.remove(&reference);
            }
            Some(entities) => {
                for entity in entities {
                    if let Some(bucket) = by_entity.entities.get_mut(*entity) {
                        bucket.remove(&reference);
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
