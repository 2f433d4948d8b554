//! The simulated agent platform behind `rowcast demo`: a snapshot of the rows the workload
//! manages, and the next change it makes to them. Pure: `workload.rs` loads the snapshot and
//! writes the changes.
//!
//! Every population is capped, so a demo left running all day keeps a small database: agents
//! per domain, instances per agent, deployments in flight, finished deployments kept (the
//! oldest are deleted first, before anything else happens) and users per organization.
//!
//! Longer than most files on purpose: one world, its six populations and the rule for each
//! next change read best side by side; none of it is used outside the demo.

use rand::Rng;
use rand::seq::IndexedRandom;

use super::flavor;

/// Most agents in one domain.
pub const AGENTS_PER_DOMAIN: usize = 5;
/// Most instances (of any status) of one agent.
pub const INSTANCES_PER_AGENT: usize = 2;
/// Most deployments pending or running at once.
pub const DEPLOYMENTS_IN_FLIGHT: usize = 6;
/// Finished deployments kept; older ones are deleted.
pub const FINISHED_DEPLOYMENTS_KEPT: usize = 30;
/// Most users in one organization.
pub const USERS_PER_ORGANIZATION: usize = 8;

pub const AGENT_STATUSES: &[&str] = &["active", "inactive", "paused", "error"];
pub const INSTANCE_STATUSES: &[&str] = &["provisioning", "running", "stopped", "failed"];
pub const DEPLOYMENT_STATUSES: &[&str] =
    &["pending", "running", "completed", "failed", "cancelled"];
pub const ROLES: &[&str] = &["owner", "admin", "member"];
pub const PLANS: &[&str] = &["free", "team", "enterprise"];

#[derive(Debug, Clone, PartialEq)]
pub struct Organization {
    pub id: String,
    pub plan: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Domain {
    pub id: String,
    pub organization_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: String,
    pub organization_id: String,
    pub domain_id: String,
    pub status: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub organization_id: String,
    pub domain_id: String,
    pub agent_id: String,
    pub status: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub id: String,
    pub organization_id: String,
    pub domain_id: String,
    /// None once its agent is retired (the foreign key sets it NULL).
    pub agent_id: Option<String>,
    pub status: &'static str,
}

impl Deployment {
    fn in_flight(&self) -> bool {
        matches!(self.status, "pending" | "running")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    pub organization_id: String,
    pub email: String,
    pub role: &'static str,
}

/// What the workload manages; deployments oldest first.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub organizations: Vec<Organization>,
    pub domains: Vec<Domain>,
    pub agents: Vec<Agent>,
    pub instances: Vec<Instance>,
    pub deployments: Vec<Deployment>,
    pub users: Vec<User>,
}

/// One change the workload writes, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    AddAgent {
        agent: Agent,
        name: String,
        model: &'static str,
        config: String,
    },
    SetAgentStatus {
        id: String,
        status: &'static str,
    },
    RetuneAgent {
        id: String,
        model: &'static str,
        config: String,
    },
    /// Deletes the agent and its instances.
    RetireAgent {
        id: String,
    },
    LaunchInstance {
        instance: Instance,
        region: &'static str,
        zone: String,
        cpu_millis: i32,
        memory_mb: i32,
    },
    SetInstanceStatus {
        id: String,
        status: &'static str,
    },
    RemoveInstance {
        id: String,
    },
    QueueDeployment {
        deployment: Deployment,
        version: String,
        metadata: String,
    },
    StartDeployment {
        id: String,
    },
    FinishDeployment {
        id: String,
        status: &'static str,
        error: Option<String>,
    },
    PruneDeployments {
        ids: Vec<String>,
    },
    AddUser {
        user: User,
        name: String,
        password_hash: String,
    },
    UserLogin {
        id: String,
    },
    SetUserRole {
        id: String,
        role: &'static str,
    },
    RemoveUser {
        id: String,
    },
    SetPlan {
        id: String,
        plan: &'static str,
    },
}

/// The kinds of change, drawn by weight among those possible right now.
#[derive(Debug, Clone, Copy)]
enum Kind {
    AddAgent,
    FlipAgent,
    RetuneAgent,
    RetireAgent,
    LaunchInstance,
    BootInstance,
    StopInstance,
    RemoveInstance,
    QueueDeployment,
    AdvanceDeployment,
    AddUser,
    UserLogin,
    SetUserRole,
    RemoveUser,
    SetPlan,
}

/// `value` as one of `allowed`, for statuses read from the database.
pub fn known(value: &str, allowed: &[&'static str]) -> Option<&'static str> {
    allowed.iter().copied().find(|a| *a == value)
}

/// Picks by weight; `None` when nothing has a positive weight.
fn weighted<T: Copy>(rng: &mut impl Rng, options: &[(f64, T)]) -> Option<T> {
    let total: f64 = options.iter().map(|(w, _)| w).sum();
    if total <= 0.0 {
        return None;
    }
    let mut point = rng.random_range(0.0..total);
    for (weight, option) in options {
        if point < *weight {
            return Some(*option);
        }
        point -= weight;
    }
    options.last().map(|(_, option)| *option)
}

fn pick<'a, T>(rng: &mut impl Rng, items: &'a [T]) -> Option<&'a T> {
    items.choose(rng)
}

fn pick_str(rng: &mut impl Rng, items: &[&'static str]) -> &'static str {
    items.choose(rng).copied().unwrap_or_default()
}

impl World {
    fn agents_in(&self, domain: &str) -> usize {
        self.agents.iter().filter(|a| a.domain_id == domain).count()
    }

    fn instances_of(&self, agent: &str) -> usize {
        self.instances.iter().filter(|i| i.agent_id == agent).count()
    }

    fn users_in(&self, organization: &str) -> usize {
        self.users.iter().filter(|u| u.organization_id == organization).count()
    }

    fn has_deployment_in_flight(&self, agent: &str) -> bool {
        self.deployments.iter().any(|d| d.in_flight() && d.agent_id.as_deref() == Some(agent))
    }

    /// The next change, or `None` when there is nothing to work with (no organizations).
    pub fn plan(&self, rng: &mut impl Rng) -> Option<Change> {
        // Housekeeping first, so the bound on finished deployments holds after every step.
        let finished: Vec<&Deployment> =
            self.deployments.iter().filter(|d| !d.in_flight()).collect();
        if finished.len() > FINISHED_DEPLOYMENTS_KEPT {
            let excess = finished.len() - FINISHED_DEPLOYMENTS_KEPT;
            let ids = finished[..excess].iter().map(|d| d.id.clone()).collect();
            return Some(Change::PruneDeployments { ids });
        }
        let open_domains: Vec<&Domain> =
            self.domains.iter().filter(|d| self.agents_in(&d.id) < AGENTS_PER_DOMAIN).collect();
        let retirable: Vec<&Agent> = self
            .agents
            .iter()
            .filter(|a| a.status != "active" && !self.has_deployment_in_flight(&a.id))
            .collect();
        let active: Vec<&Agent> = self.agents.iter().filter(|a| a.status == "active").collect();
        let launchable: Vec<&Agent> = active
            .iter()
            .copied()
            .filter(|a| self.instances_of(&a.id) < INSTANCES_PER_AGENT)
            .collect();
        let with_status = |status: &str| -> Vec<&Instance> {
            self.instances.iter().filter(|i| i.status == status).collect()
        };
        let (provisioning, running) = (with_status("provisioning"), with_status("running"));
        let ended: Vec<&Instance> =
            self.instances.iter().filter(|i| matches!(i.status, "stopped" | "failed")).collect();
        let in_flight: Vec<&Deployment> =
            self.deployments.iter().filter(|d| d.in_flight()).collect();
        let open_organizations: Vec<&Organization> = self
            .organizations
            .iter()
            .filter(|o| self.users_in(&o.id) < USERS_PER_ORGANIZATION)
            .collect();
        let members: Vec<&User> = self.users.iter().filter(|u| u.role != "owner").collect();
        let leavers: Vec<&User> =
            members.iter().copied().filter(|u| self.users_in(&u.organization_id) > 2).collect();

        let when = |possible: bool, weight: f64| if possible { weight } else { 0.0 };
        // A young world grows agents quickly, then mostly lives: statuses and deployments.
        let growth = if self.agents.len() < self.domains.len() * 2 { 4.0 } else { 0.5 };
        let kinds = [
            (when(!open_domains.is_empty(), growth), Kind::AddAgent),
            (when(!self.agents.is_empty(), 3.0), Kind::FlipAgent),
            (when(!self.agents.is_empty(), 0.4), Kind::RetuneAgent),
            (
                when(!retirable.is_empty() && self.agents.len() > self.domains.len(), 0.25),
                Kind::RetireAgent,
            ),
            (when(!launchable.is_empty(), 1.0), Kind::LaunchInstance),
            (when(!provisioning.is_empty(), 2.0), Kind::BootInstance),
            (when(!running.is_empty(), 0.4), Kind::StopInstance),
            (when(!ended.is_empty(), 0.6), Kind::RemoveInstance),
            (
                when(!active.is_empty() && in_flight.len() < DEPLOYMENTS_IN_FLIGHT, 1.5),
                Kind::QueueDeployment,
            ),
            (when(!in_flight.is_empty(), 3.0), Kind::AdvanceDeployment),
            (when(!open_organizations.is_empty(), 0.5), Kind::AddUser),
            (when(!self.users.is_empty(), 0.8), Kind::UserLogin),
            (when(!members.is_empty(), 0.2), Kind::SetUserRole),
            (when(!leavers.is_empty(), 0.3), Kind::RemoveUser),
            (when(!self.organizations.is_empty(), 0.05), Kind::SetPlan),
        ];
        let change = match weighted(rng, &kinds)? {
            Kind::AddAgent => {
                let domain = pick(rng, &open_domains)?;
                Change::AddAgent {
                    agent: Agent {
                        id: flavor::id(rng, "agt"),
                        organization_id: domain.organization_id.clone(),
                        domain_id: domain.id.clone(),
                        status: "inactive",
                    },
                    name: pick_str(rng, flavor::AGENT_NAMES).to_owned(),
                    model: pick_str(rng, flavor::MODELS),
                    config: flavor::agent_config(rng),
                }
            }
            Kind::FlipAgent => {
                let agent = pick(rng, &self.agents)?;
                let next: &[(f64, &str)] = match agent.status {
                    "inactive" => &[(0.85, "active"), (0.15, "paused")],
                    "active" => &[(0.6, "inactive"), (0.25, "error"), (0.15, "paused")],
                    "error" => &[(0.7, "active"), (0.3, "inactive")],
                    _ => &[(0.8, "active"), (0.2, "inactive")],
                };
                Change::SetAgentStatus { id: agent.id.clone(), status: weighted(rng, next)? }
            }
            Kind::RetuneAgent => Change::RetuneAgent {
                id: pick(rng, &self.agents)?.id.clone(),
                model: pick_str(rng, flavor::MODELS),
                config: flavor::agent_config(rng),
            },
            Kind::RetireAgent => Change::RetireAgent { id: pick(rng, &retirable)?.id.clone() },
            Kind::LaunchInstance => {
                let agent = pick(rng, &launchable)?;
                let region = pick_str(rng, flavor::REGIONS);
                Change::LaunchInstance {
                    instance: Instance {
                        id: flavor::id(rng, "ins"),
                        organization_id: agent.organization_id.clone(),
                        domain_id: agent.domain_id.clone(),
                        agent_id: agent.id.clone(),
                        status: "provisioning",
                    },
                    region,
                    zone: format!("{region}{}", pick_str(rng, &["a", "b", "c"])),
                    cpu_millis: *pick(rng, flavor::CPU_MILLIS)?,
                    memory_mb: *pick(rng, flavor::MEMORY_MB)?,
                }
            }
            Kind::BootInstance => Change::SetInstanceStatus {
                id: pick(rng, &provisioning)?.id.clone(),
                status: weighted(rng, &[(0.9, "running"), (0.1, "failed")])?,
            },
            Kind::StopInstance => Change::SetInstanceStatus {
                id: pick(rng, &running)?.id.clone(),
                status: weighted(rng, &[(0.75, "stopped"), (0.25, "failed")])?,
            },
            Kind::RemoveInstance => Change::RemoveInstance { id: pick(rng, &ended)?.id.clone() },
            Kind::QueueDeployment => {
                let agent = pick(rng, &active)?;
                let triggered_by = match pick(rng, &self.users) {
                    Some(user) if rng.random_bool(0.4) => user.email.clone(),
                    _ => "ci".to_owned(),
                };
                Change::QueueDeployment {
                    deployment: Deployment {
                        id: flavor::id(rng, "dep"),
                        organization_id: agent.organization_id.clone(),
                        domain_id: agent.domain_id.clone(),
                        agent_id: Some(agent.id.clone()),
                        status: "pending",
                    },
                    version: flavor::version(rng),
                    metadata: flavor::deployment_metadata(rng, &triggered_by),
                }
            }
            Kind::AdvanceDeployment => {
                let deployment = pick(rng, &in_flight)?;
                let id = deployment.id.clone();
                if deployment.status == "pending" {
                    match weighted(rng, &[(0.93, "running"), (0.07, "cancelled")])? {
                        "running" => Change::StartDeployment { id },
                        status => Change::FinishDeployment { id, status, error: None },
                    }
                } else if rng.random_bool(0.82) {
                    Change::FinishDeployment { id, status: "completed", error: None }
                } else {
                    let error = pick_str(rng, flavor::DEPLOYMENT_ERRORS).to_owned();
                    Change::FinishDeployment { id, status: "failed", error: Some(error) }
                }
            }
            Kind::AddUser => {
                let organization = pick(rng, &open_organizations)?;
                let (first, last) = *pick(rng, flavor::PEOPLE)?;
                let local = format!("{}.{}", first.to_lowercase(), last.to_lowercase());
                let domain = format!("{}.example", organization.id);
                let email = (1..)
                    .map(|n| match n {
                        1 => format!("{local}@{domain}"),
                        n => format!("{local}{n}@{domain}"),
                    })
                    .find(|email| self.users.iter().all(|u| &u.email != email))?;
                Change::AddUser {
                    user: User {
                        id: flavor::id(rng, "usr"),
                        organization_id: organization.id.clone(),
                        email,
                        role: weighted(rng, &[(0.8, "member"), (0.2, "admin")])?,
                    },
                    name: format!("{first} {last}"),
                    password_hash: flavor::password_hash(rng),
                }
            }
            Kind::UserLogin => Change::UserLogin { id: pick(rng, &self.users)?.id.clone() },
            Kind::SetUserRole => {
                let user = pick(rng, &members)?;
                let role = if user.role == "admin" { "member" } else { "admin" };
                Change::SetUserRole { id: user.id.clone(), role }
            }
            Kind::RemoveUser => Change::RemoveUser { id: pick(rng, &leavers)?.id.clone() },
            Kind::SetPlan => {
                let organization = pick(rng, &self.organizations)?;
                let others: Vec<&'static str> =
                    PLANS.iter().copied().filter(|p| *p != organization.plan).collect();
                Change::SetPlan { id: organization.id.clone(), plan: pick_str(rng, &others) }
            }
        };
        Some(change)
    }

    /// The world after `change` was written.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::AddAgent { agent, .. } => self.agents.push(agent.clone()),
            Change::SetAgentStatus { id, status } => {
                if let Some(agent) = self.agents.iter_mut().find(|a| &a.id == id) {
                    agent.status = status;
                }
            }
            Change::RetireAgent { id } => {
                self.agents.retain(|a| &a.id != id);
                self.instances.retain(|i| &i.agent_id != id);
                for deployment in &mut self.deployments {
                    if deployment.agent_id.as_ref() == Some(id) {
                        deployment.agent_id = None;
                    }
                }
            }
            Change::LaunchInstance { instance, .. } => self.instances.push(instance.clone()),
            Change::SetInstanceStatus { id, status } => {
                if let Some(instance) = self.instances.iter_mut().find(|i| &i.id == id) {
                    instance.status = status;
                }
            }
            Change::RemoveInstance { id } => self.instances.retain(|i| &i.id != id),
            Change::QueueDeployment { deployment, .. } => self.deployments.push(deployment.clone()),
            Change::StartDeployment { id } => self.set_deployment_status(id, "running"),
            Change::FinishDeployment { id, status, .. } => self.set_deployment_status(id, status),
            Change::PruneDeployments { ids } => self.deployments.retain(|d| !ids.contains(&d.id)),
            Change::AddUser { user, .. } => self.users.push(user.clone()),
            Change::SetUserRole { id, role } => {
                if let Some(user) = self.users.iter_mut().find(|u| &u.id == id) {
                    user.role = role;
                }
            }
            Change::RemoveUser { id } => self.users.retain(|u| &u.id != id),
            Change::SetPlan { id, plan } => {
                if let Some(organization) = self.organizations.iter_mut().find(|o| &o.id == id) {
                    organization.plan = plan;
                }
            }
            Change::RetuneAgent { .. } | Change::UserLogin { .. } => {}
        }
    }

    fn set_deployment_status(&mut self, id: &str, status: &'static str) {
        if let Some(deployment) = self.deployments.iter_mut().find(|d| d.id == id) {
            deployment.status = status;
        }
    }
}

#[cfg(test)]
mod tests;
