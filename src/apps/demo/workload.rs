//! The demo's simulated application: it writes one change of the [`World`] at a time, at a
//! steady rate, like an application that knows nothing about rowcast.
//!
//! The world is read from the database at start and after anything unexpected (an error, or a
//! change that found its row gone because someone edited the data by hand), so the workload
//! never trusts a picture of the data that may be stale. Every error is retried after a
//! backoff: a demo keeps going while its database restarts.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::world::{
    AGENT_STATUSES, Agent, Change, DEPLOYMENT_STATUSES, Deployment, Domain, INSTANCE_STATUSES,
    Instance, Organization, PLANS, ROLES, User, World, known,
};
use crate::backoff::Backoff;

/// The first wait after an error; it grows up to `MAX_BACKOFF` (see [`Backoff`]).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub struct Workload {
    database: crate::pg::Target,
    period: Duration,
    rng: StdRng,
    backoff: Backoff,
}

impl Workload {
    /// `rate` changes per second (at least 1), repeatable for a given `seed`.
    pub fn new(database: crate::pg::Target, rate: u32, seed: u64) -> Self {
        Self {
            database,
            period: Duration::from_secs(1) / rate.max(1),
            rng: StdRng::seed_from_u64(seed),
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
        }
    }

    /// Writes changes until `shutdown`; a write in flight is abandoned (its transaction rolls
    /// back with the connection).
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.session() => result,
            };
            let delay = self.backoff.next_delay();
            if let Err(err) = result {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "demo workload interrupted");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's worth of changes; returns only on an error.
    async fn session(&mut self) -> Result<(), tokio_postgres::Error> {
        let mut client = crate::pg::connect(&self.database, "demo workload").await?;
        let mut world = load(&client).await?;
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(change) = world.plan(&mut self.rng) else {
                world = load(&client).await?;
                continue;
            };
            if write(&mut client, &change).await? {
                tracing::debug!(?change, "demo change");
                world.apply(&change);
            } else {
                tracing::debug!(?change, "demo change found its rows changed; reloading");
                world = load(&client).await?;
            }
            self.backoff.reset();
        }
    }
}

/// Reads the rows the workload manages. Rows it cannot place (no domain, a status it does
/// not know) are left alone.
async fn load(client: &Client) -> Result<World, tokio_postgres::Error> {
    let organizations = client
        .query("SELECT id, plan FROM organizations ORDER BY id", &[])
        .await?
        .iter()
        .filter_map(|r| Some(Organization { id: r.get(0), plan: known(r.get(1), PLANS)? }))
        .collect();
    let domains = client
        .query("SELECT id, organization_id FROM domains ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| Domain { id: r.get(0), organization_id: r.get(1) })
        .collect();
    let agents = client
        .query(
            "SELECT id, organization_id, domain_id, status FROM agents
              WHERE domain_id IS NOT NULL ORDER BY created_at, id",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| {
            Some(Agent {
                id: r.get(0),
                organization_id: r.get(1),
                domain_id: r.get(2),
                status: known(r.get(3), AGENT_STATUSES)?,
            })
        })
        .collect();
    let instances = client
        .query(
            "SELECT id, organization_id, domain_id, agent_id, status FROM instances
              WHERE domain_id IS NOT NULL AND agent_id IS NOT NULL ORDER BY created_at, id",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| {
            Some(Instance {
                id: r.get(0),
                organization_id: r.get(1),
                domain_id: r.get(2),
                agent_id: r.get(3),
                status: known(r.get(4), INSTANCE_STATUSES)?,
            })
        })
        .collect();
    let deployments = client
        .query(
            "SELECT id, organization_id, domain_id, agent_id, status FROM deployments
              WHERE domain_id IS NOT NULL ORDER BY created_at, id",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| {
            Some(Deployment {
                id: r.get(0),
                organization_id: r.get(1),
                domain_id: r.get(2),
                agent_id: r.get(3),
                status: known(r.get(4), DEPLOYMENT_STATUSES)?,
            })
        })
        .collect();
    let users = client
        .query("SELECT id, organization_id, email, role FROM users ORDER BY created_at, id", &[])
        .await?
        .iter()
        .filter_map(|r| {
            Some(User {
                id: r.get(0),
                organization_id: r.get(1),
                email: r.get(2),
                role: known(r.get(3), ROLES)?,
            })
        })
        .collect();
    Ok(World { organizations, domains, agents, instances, deployments, users })
}

/// Writes `change`; false when its rows were not as the world said (edited by someone else).
async fn write(client: &mut Client, change: &Change) -> Result<bool, tokio_postgres::Error> {
    let rows = match change {
        Change::AddAgent { agent, name, model, config } => client
            .execute(
                "INSERT INTO agents (id, organization_id, domain_id, name, status, model, config)
                     VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)",
                &[
                    &agent.id,
                    &agent.organization_id,
                    &agent.domain_id,
                    name,
                    &agent.status,
                    model,
                    config,
                ],
            )
            .await?,
        Change::SetAgentStatus { id, status } => {
            client
                .execute(
                    // An application event in the same transaction (SPEC §3a): the agent reports.
                    "WITH seen AS (
                         UPDATE agents SET status = $2::text,
                                last_seen_at = CASE WHEN $2::text = 'active' THEN now() ELSE last_seen_at END
                          WHERE id = $1
                      RETURNING id, organization_id, domain_id, status)
                     SELECT rowcast.emit('agent.heartbeat', jsonb_build_object('id', id, 'status', status),
                                         organization_id => seen.organization_id,
                                         domain_id => seen.domain_id)
                       FROM seen",
                    &[id, status],
                )
                .await?
        }
        Change::RetuneAgent { id, model, config } => {
            client
                .execute(
                    "UPDATE agents SET model = $2, config = $3::text::jsonb WHERE id = $1",
                    &[id, model, config],
                )
                .await?
        }
        Change::RetireAgent { id } => {
            let transaction = client.transaction().await?;
            transaction.execute("DELETE FROM instances WHERE agent_id = $1", &[id]).await?;
            let rows = transaction.execute("DELETE FROM agents WHERE id = $1", &[id]).await?;
            transaction.commit().await?;
            rows
        }
        Change::LaunchInstance { instance, region, zone, cpu_millis, memory_mb } => client
            .execute(
                "INSERT INTO instances (id, organization_id, domain_id, agent_id, region, status,
                                            cpu_millis, memory_mb, metadata)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, jsonb_build_object('zone', $9::text))",
                &[
                    &instance.id,
                    &instance.organization_id,
                    &instance.domain_id,
                    &instance.agent_id,
                    region,
                    &instance.status,
                    cpu_millis,
                    memory_mb,
                    zone,
                ],
            )
            .await?,
        Change::SetInstanceStatus { id, status } => {
            client.execute("UPDATE instances SET status = $2 WHERE id = $1", &[id, status]).await?
        }
        Change::RemoveInstance { id } => {
            client.execute("DELETE FROM instances WHERE id = $1", &[id]).await?
        }
        Change::QueueDeployment { deployment, version, metadata } => {
            client
                .execute(
                    "INSERT INTO deployments (id, organization_id, domain_id, agent_id, version,
                                              status, metadata)
                     VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)",
                    &[
                        &deployment.id,
                        &deployment.organization_id,
                        &deployment.domain_id,
                        &deployment.agent_id,
                        version,
                        &deployment.status,
                        metadata,
                    ],
                )
                .await?
        }
        Change::StartDeployment { id } => {
            client
                .execute(
                    "WITH started AS (
                         UPDATE deployments SET status = 'running', started_at = now()
                          WHERE id = $1 AND status = 'pending'
                      RETURNING id, organization_id, domain_id, version)
                     SELECT rowcast.emit('deployment.log',
                                         jsonb_build_object('deployment_id', id, 'line',
                                                            'building ' || version || ': step 1/3'),
                                         organization_id => started.organization_id,
                                         domain_id => started.domain_id)
                       FROM started",
                    &[id],
                )
                .await?
        }
        Change::FinishDeployment { id, status, error } => {
            client
                .execute(
                    "UPDATE deployments SET status = $2, finished_at = now(), error = $3
                      WHERE id = $1 AND status IN ('pending', 'running')",
                    &[id, status, error],
                )
                .await?
        }
        Change::PruneDeployments { ids } => {
            let rows = client.execute("DELETE FROM deployments WHERE id = ANY($1)", &[ids]).await?;
            return Ok(rows == ids.len() as u64);
        }
        Change::AddUser { user, name, password_hash } => {
            client
                .execute(
                    "INSERT INTO users (id, organization_id, email, name, role, password_hash)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &user.id,
                        &user.organization_id,
                        &user.email,
                        name,
                        &user.role,
                        password_hash,
                    ],
                )
                .await?
        }
        Change::UserLogin { id } => {
            client.execute("UPDATE users SET last_login_at = now() WHERE id = $1", &[id]).await?
        }
        Change::SetUserRole { id, role } => {
            client.execute("UPDATE users SET role = $2 WHERE id = $1", &[id, role]).await?
        }
        Change::RemoveUser { id } => {
            client.execute("DELETE FROM users WHERE id = $1", &[id]).await?
        }
        Change::SetPlan { id, plan } => {
            client.execute("UPDATE organizations SET plan = $2 WHERE id = $1", &[id, plan]).await?
        }
    };
    Ok(rows == 1)
}
