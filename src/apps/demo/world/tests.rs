//! The simulated world: plans stay within its rules, whatever the seed.

use std::collections::BTreeSet;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

/// What `seed.sql` creates.
fn seeded() -> World {
    let organizations = [("quant", "enterprise"), ("acme", "team"), ("globex", "free")];
    let domains = [
        ("research", "quant"),
        ("trading", "quant"),
        ("support", "acme"),
        ("sales", "acme"),
        ("operations", "globex"),
        ("labs", "globex"),
    ];
    World {
        organizations: organizations
            .iter()
            .map(|(id, plan)| Organization { id: id.to_string(), plan })
            .collect(),
        domains: domains
            .iter()
            .map(|(id, org)| Domain { id: id.to_string(), organization_id: org.to_string() })
            .collect(),
        users: organizations
            .iter()
            .map(|(org, _)| User {
                id: format!("usr-owner-{org}"),
                organization_id: org.to_string(),
                email: format!("owner@{org}.example"),
                role: "owner",
            })
            .collect(),
        ..World::default()
    }
}

fn check_bounds(world: &World) {
    for domain in &world.domains {
        assert!(world.agents_in(&domain.id) <= AGENTS_PER_DOMAIN, "{domain:?}");
    }
    for agent in &world.agents {
        assert!(world.instances_of(&agent.id) <= INSTANCES_PER_AGENT, "{agent:?}");
    }
    let in_flight = world.deployments.iter().filter(|d| d.in_flight()).count();
    assert!(in_flight <= DEPLOYMENTS_IN_FLIGHT);
    // One deployment may finish before the next step prunes.
    assert!(world.deployments.len() - in_flight <= FINISHED_DEPLOYMENTS_KEPT + 1);
    for organization in &world.organizations {
        assert!(world.users_in(&organization.id) <= USERS_PER_ORGANIZATION);
        let owners = world
            .users
            .iter()
            .filter(|u| u.organization_id == organization.id && u.role == "owner")
            .count();
        assert_eq!(owners, 1, "the owner of {} never leaves", organization.id);
    }
    let emails: BTreeSet<&str> = world.users.iter().map(|u| u.email.as_str()).collect();
    assert_eq!(emails.len(), world.users.len(), "emails are unique");
}

/// A long run stays within every bound, only makes legal transitions, and shows every kind
/// of change (so every event type of the reference mapping appears in the demo).
#[test]
fn long_runs_stay_bounded_and_varied() {
    for seed in 0..3 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut world = seeded();
        let mut seen = BTreeSet::new();
        let mut endings = BTreeSet::new();
        for _ in 0..4_000 {
            let change = world.plan(&mut rng).expect("a seeded world always has work");
            match &change {
                Change::StartDeployment { id } => {
                    let d = world.deployments.iter().find(|d| &d.id == id).expect("exists");
                    assert_eq!(d.status, "pending");
                }
                Change::FinishDeployment { id, status, error } => {
                    let d = world.deployments.iter().find(|d| &d.id == id).expect("exists");
                    let from = if *status == "cancelled" { "pending" } else { "running" };
                    assert_eq!(d.status, from);
                    assert_eq!(error.is_some(), *status == "failed");
                    endings.insert(*status);
                }
                Change::SetAgentStatus { id, status } => {
                    let a = world.agents.iter().find(|a| &a.id == id).expect("exists");
                    assert_ne!(a.status, *status);
                    assert!(AGENT_STATUSES.contains(status));
                }
                Change::AddAgent { agent, config, .. } => {
                    assert!(serde_json::from_str::<serde_json::Value>(config).is_ok());
                    assert!(
                        world.domains.iter().any(|d| d.id == agent.domain_id
                            && d.organization_id == agent.organization_id)
                    );
                }
                _ => {}
            }
            let kind = format!("{change:?}");
            seen.insert(kind[..kind.find([' ', '{']).unwrap_or(kind.len())].to_owned());
            world.apply(&change);
            check_bounds(&world);
        }
        assert_eq!(seen.len(), 16, "seed {seed}: only {seen:?}");
        assert_eq!(endings.len(), 3, "seed {seed}: deployments only ended {endings:?}");
    }
}

#[test]
fn an_empty_world_has_nothing_to_do() {
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(World::default().plan(&mut rng), None);
}

#[test]
fn the_oldest_finished_deployments_go_first() {
    let mut world = seeded();
    let deployment = |n: usize, status| Deployment {
        id: format!("dep-{n}"),
        organization_id: "quant".into(),
        domain_id: "research".into(),
        agent_id: None,
        status,
    };
    world.deployments.push(deployment(0, "running"));
    for n in 1..=FINISHED_DEPLOYMENTS_KEPT + 2 {
        world.deployments.push(deployment(n, "completed"));
    }
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(
        world.plan(&mut rng),
        Some(Change::PruneDeployments { ids: vec!["dep-1".into(), "dep-2".into()] })
    );
}

#[test]
fn weighted_picks_respect_zero_weights() {
    let mut rng = StdRng::seed_from_u64(7);
    assert_eq!(weighted::<u8>(&mut rng, &[]), None);
    assert_eq!(weighted(&mut rng, &[(0.0, 1), (0.0, 2)]), None);
    for _ in 0..1000 {
        assert_eq!(weighted(&mut rng, &[(0.0, 1), (2.0, 2), (0.0, 3)]), Some(2));
    }
}

#[test]
fn statuses_from_the_database() {
    assert_eq!(known("active", AGENT_STATUSES), Some("active"));
    assert_eq!(known("exploded", AGENT_STATUSES), None);
}
