//! `rowcast setup` and `rowcast migrate`: everything installed in the databases, idempotently.
//!
//! - the log schema (`migrations/rowcast.sql`) in the log database;
//! - for replication: `REPLICA IDENTITY FULL` on each mapped table, so updates and deletes
//!   carry the whole old row (and unchanged TOASTed values can be filled in), and the
//!   publication set to exactly the mapped tables;
//! - the mapping checked against the catalog first, so a missing table or column is reported
//!   by name before anything is changed.

use tokio_postgres::Client;

use crate::capture::catalog::{Catalog, CatalogError};
use crate::capture::replication::quote_ident;
use crate::config::{Settings, SourceMode};
use crate::log::{self, LogError};
use crate::mapping::{Mapping, MappingError, TableName};

pub const REFERENCE_SCHEMA_SQL: &str = include_str!("../migrations/reference.sql");

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("source database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("replication slot {slot:?} {problem}; choose another --slot")]
    Slot { slot: String, problem: String },
}

impl SetupError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SetupError::Postgres(err) => err.is_closed() || err.code().is_none(),
            SetupError::Log(err) => err.is_retryable(),
            SetupError::Mapping(_) | SetupError::Catalog(_) | SetupError::Slot { .. } => false,
        }
    }
}

/// Applies the reference six-table schema.
pub async fn migrate(client: &Client) -> Result<(), SetupError> {
    client.batch_execute(REFERENCE_SCHEMA_SQL).await?;
    Ok(())
}

/// Checks the mapping against the source database's catalog.
pub async fn check_mapping(catalog: &Catalog, mapping: &Mapping) -> Result<(), SetupError> {
    let tables: Vec<TableName> = mapping.entities().iter().map(|e| e.table.clone()).collect();
    let columns = catalog.columns(&tables).await?;
    mapping.check_columns(&columns)?;
    Ok(())
}

/// Installs the log schema and prepares the source for replication.
pub async fn setup_replication(settings: &Settings) -> Result<(), SetupError> {
    let log_client = log::connect(&settings.log, "setup").await?;
    log::install(&log_client).await?;
    drop(log_client);

    let catalog = Catalog::new(log::connect(&settings.database, "setup").await?);
    check_mapping(&catalog, &settings.mapping).await?;
    let client = catalog.client();
    let tables: Vec<&TableName> = settings.mapping.entities().iter().map(|e| &e.table).collect();
    for table in &tables {
        // Old rows are logged per leaf partition, so every partition needs FULL, not just the
        // root. Partitions created later get it at the next `setup`.
        let rows = client
            .query(
                "WITH root AS (SELECT format('%I.%I', $1::text, $2::text)::regclass AS relid),
                      tree AS (SELECT relid FROM root
                               UNION SELECT t.relid FROM root, pg_partition_tree(root.relid) t)
                 SELECT n.nspname::text, c.relname::text
                   FROM tree JOIN pg_class c ON c.oid = tree.relid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relreplident <> 'f'",
                &[&table.schema, &table.name],
            )
            .await?;
        for row in rows {
            let relation = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
            client
                .batch_execute(&format!("ALTER TABLE {} REPLICA IDENTITY FULL", relation.sql()))
                .await?;
            tracing::info!(table = %relation, "set replica identity full");
        }
    }
    let list = tables.iter().map(|t| t.sql()).collect::<Vec<_>>().join(", ");
    let publication = quote_ident(&settings.publication);
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&settings.publication])
        .await?
        .is_some();
    if exists {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {publication} SET TABLE {list};
                 ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
            ))
            .await?;
    } else {
        // Changes of a partitioned table are published as the table itself, not its partitions.
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {publication} FOR TABLE {list} WITH (publish_via_partition_root = true)"
            ))
            .await?;
        tracing::info!(publication = %settings.publication, "created publication");
    }
    Ok(())
}

/// `--source auto`: replication when the server and role allow it, otherwise triggers. Returns
/// the choice and the reason, for the log.
pub async fn choose_source(client: &Client) -> Result<(SourceMode, String), SetupError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), r.rolreplication OR r.rolsuper \
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let wal_level: String = row.get(0);
    let may_replicate: bool = row.get(1);
    Ok(match (wal_level.as_str(), may_replicate) {
        ("logical", true) => {
            (SourceMode::Replication, "wal_level=logical and the role may replicate".into())
        }
        ("logical", false) => {
            (SourceMode::Triggers, "the role has neither REPLICATION nor SUPERUSER".into())
        }
        (level, _) => {
            (SourceMode::Triggers, format!("wal_level={level}, logical replication needs logical"))
        }
    })
}

/// Slot names are cluster-wide: make sure an existing slot of this name is ours to use (this
/// database, pgoutput) before streaming, rather than waiting on another database's slot.
pub async fn check_slot(client: &Client, slot: &str) -> Result<(), SetupError> {
    let row = client
        .query_opt(
            "SELECT database::text, current_database()::text, plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else { return Ok(()) };
    let (database, current, plugin): (Option<String>, String, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    let problem = match (database, plugin) {
        (None, _) => "is a physical slot".to_owned(),
        (Some(database), _) if database != current => format!("belongs to database {database:?}"),
        (_, Some(plugin)) if plugin != "pgoutput" => {
            format!("uses the {plugin:?} plugin, not pgoutput")
        }
        _ => return Ok(()),
    };
    Err(SetupError::Slot { slot: slot.to_owned(), problem })
}
