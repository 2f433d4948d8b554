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
use crate::config::{Settings, SourceMode};
use crate::log::{self, LogError};
use crate::mapping::{Mapping, MappingError};
use crate::model::TableName;
use crate::pg::{Target, quote_ident, quote_literal};

pub const REFERENCE_SCHEMA_SQL: &str = include_str!("../migrations/reference.sql");
pub const TRIGGER_CAPTURE_SQL: &str = include_str!("../triggers/capture.sql");
pub const EMIT_SQL: &str = include_str!("../triggers/emit.sql");

/// Where `rowcast.emit()` sends application events (`rowcast.emit_route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitRoute {
    Replication,
    Triggers,
}

impl EmitRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            EmitRoute::Replication => "replication",
            EmitRoute::Triggers => "triggers",
        }
    }
}

/// Installs `rowcast.emit()` in the source database with the mapping's declared application
/// event types, the largest event (`--max-event-bytes`), and the route it sends events by if none is set yet. An existing route is kept:
/// only a capture switch's transaction changes it (see `publisher::switch`), so setting up the
/// new source before a switch does not send events where nobody captures them yet.
pub async fn install_emit(
    client: &Client,
    settings: &Settings,
    route: EmitRoute,
) -> Result<(), SetupError> {
    let mapping = &settings.mapping;
    client.batch_execute(EMIT_SQL).await?;
    let max_bytes = i32::try_from(settings.server.max_event_bytes).unwrap_or(i32::MAX);
    client
        .execute(
            "INSERT INTO rowcast.emit_limits (max_event_bytes) VALUES ($1)
             ON CONFLICT (singleton) DO UPDATE SET max_event_bytes = excluded.max_event_bytes",
            &[&max_bytes],
        )
        .await?;
    let types: Vec<&str> = mapping.app_events().iter().map(|d| d.event_type.as_str()).collect();
    let severities: Vec<&str> = mapping.app_events().iter().map(|d| d.severity.as_str()).collect();
    client
        .execute(
            "WITH declared AS (SELECT * FROM unnest($1::text[], $2::text[]) AS d(type, severity)),
                  gone AS (DELETE FROM rowcast.event_types t
                            WHERE NOT EXISTS (SELECT 1 FROM declared d WHERE d.type = t.type))
             INSERT INTO rowcast.event_types (type, severity) SELECT type, severity FROM declared
             ON CONFLICT (type) DO UPDATE SET severity = excluded.severity",
            &[&types, &severities],
        )
        .await?;
    client
        .execute(
            "INSERT INTO rowcast.emit_route (via) VALUES ($1) ON CONFLICT (singleton) DO NOTHING",
            &[&route.as_str()],
        )
        .await?;
    Ok(())
}

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
    #[error(
        "trigger capture keeps its outbox in the source database and appends to the event log \
         in the same transaction: the log must live there too (leave out --log-url)"
    )]
    SeparateLog,
    #[error("the source database is not ready for {capture} capture:\n{problems}")]
    NotReady { capture: &'static str, problems: String },
}

impl SetupError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SetupError::Postgres(err) => crate::pg::is_transient(err),
            SetupError::Log(err) => err.is_retryable(),
            SetupError::Catalog(err) => err.is_retryable(),
            SetupError::Mapping(_)
            | SetupError::Slot { .. }
            | SetupError::SeparateLog
            | SetupError::NotReady { .. } => false,
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

/// What the source must allow before setup changes anything, each problem with its fix:
/// logical WAL and the REPLICATION attribute for replication, and for both sources ownership
/// of the mapped tables (replica identity and triggers are an owner's business).
pub async fn preflight(
    client: &Client,
    mapping: &Mapping,
    source: SourceMode,
) -> Result<(), SetupError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), r.rolreplication, r.rolsuper, current_user::text
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (wal_level, replication, superuser, user): (String, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let mut problems = Vec::new();
    if source != SourceMode::Triggers {
        if wal_level != "logical" {
            problems.push(format!(
                "- wal_level is {wal_level}: run ALTER SYSTEM SET wal_level = logical and restart Postgres, or use --source triggers"
            ));
        }
        if !replication && !superuser {
            problems.push(format!(
                "- role {user} may not replicate: ALTER ROLE {} REPLICATION, or use --source triggers",
                quote_ident(&user)
            ));
        }
    }
    if !superuser {
        let schemas: Vec<&str> =
            mapping.entities().iter().map(|e| e.table.schema.as_str()).collect();
        let names: Vec<&str> = mapping.entities().iter().map(|e| e.table.name.as_str()).collect();
        let rows = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname)
                   FROM unnest($1::text[], $2::text[]) AS w(schema, name)
                   JOIN pg_namespace n ON n.nspname = w.schema
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.name
                  WHERE NOT pg_has_role(current_user, c.relowner, 'USAGE')",
                &[&schemas, &names],
            )
            .await?;
        if !rows.is_empty() {
            let tables: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
            let what = match source {
                SourceMode::Triggers => "creates capture triggers on them",
                _ => "sets REPLICA IDENTITY FULL on them",
            };
            problems.push(format!(
                "- role {user} does not own {}: setup {what}, which only their owner may; run setup as the owner or ALTER TABLE ... OWNER TO {}",
                tables.join(", "),
                quote_ident(&user)
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let capture = if source == SourceMode::Triggers { "trigger" } else { "replication" };
    Err(SetupError::NotReady { capture, problems: problems.join("\n") })
}

/// Checks the source, then installs the log schema and prepares the source for replication.
pub async fn setup_replication(settings: &Settings) -> Result<(), SetupError> {
    let catalog = Catalog::new(crate::pg::connect(&settings.database, "setup").await?);
    check_mapping(&catalog, &settings.mapping).await?;
    preflight(catalog.client(), &settings.mapping, SourceMode::Replication).await?;

    let log_client = crate::pg::connect(&settings.log, "setup").await.map_err(LogError::from)?;
    log::install(&log_client).await?;
    drop(log_client);

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
    install_emit(client, settings, EmitRoute::Replication).await?;
    Ok(())
}

/// Whether two connection targets name the same database on the same server.
pub fn same_database(a: &Target, b: &Target) -> bool {
    let (a, b) = (&a.config, &b.config);
    a.get_hosts() == b.get_hosts()
        && a.get_ports() == b.get_ports()
        && a.get_dbname() == b.get_dbname()
}

/// Installs the log schema, the outbox and the capture function, then the capture triggers
/// of every mapped table (`triggers/capture.sql`).
pub async fn setup_triggers(settings: &Settings) -> Result<(), SetupError> {
    let catalog = prepare_triggers(settings).await?;
    catalog.client().batch_execute(&capture_triggers_sql(&settings.mapping)).await?;
    for entity in settings.mapping.entities() {
        tracing::info!(table = %entity.table, "installed capture triggers");
    }
    Ok(())
}

/// Everything trigger capture needs except the triggers themselves: the checks, the log
/// schema, the outbox and the capture function. Returns the connection to the source.
pub async fn prepare_triggers(settings: &Settings) -> Result<Catalog, SetupError> {
    if !same_database(&settings.database, &settings.log) {
        return Err(SetupError::SeparateLog);
    }
    let catalog = Catalog::new(crate::pg::connect(&settings.database, "setup").await?);
    check_mapping(&catalog, &settings.mapping).await?;
    preflight(catalog.client(), &settings.mapping, SourceMode::Triggers).await?;
    let client = catalog.client();
    log::install(client).await?;
    client.batch_execute(TRIGGER_CAPTURE_SQL).await?;
    install_emit(client, settings, EmitRoute::Triggers).await?;
    Ok(catalog)
}

/// The statements that put the capture triggers on every mapped table (idempotent; see
/// `rowcast.install_capture` in `triggers/capture.sql`).
pub fn capture_triggers_sql(mapping: &Mapping) -> String {
    let mut sql = String::new();
    for entity in mapping.entities() {
        let table = &entity.table;
        sql.push_str(&format!(
            "SELECT rowcast.install_capture({}::regclass, {}, {});\n",
            quote_literal(&table.sql()),
            quote_literal(&table.schema),
            quote_literal(&table.name)
        ));
    }
    sql
}

/// Every trigger trigger capture puts on a table.
const CAPTURE_TRIGGERS: [&str; 4] = [
    "rowcast_capture",
    "rowcast_capture_insert",
    "rowcast_capture_delete",
    "rowcast_capture_truncate",
];

/// The statements that take the capture triggers off `table`.
fn drop_triggers_sql(table: &TableName) -> String {
    CAPTURE_TRIGGERS
        .iter()
        .map(|name| format!("DROP TRIGGER IF EXISTS {name} ON {};\n", table.sql()))
        .collect()
}

/// The statements that take the capture triggers off every mapped table.
pub fn drop_capture_triggers_sql(mapping: &Mapping) -> String {
    mapping.entities().iter().map(|entity| drop_triggers_sql(&entity.table)).collect()
}

/// Removes the capture triggers from every table that has them, and the capture functions.
/// The outbox stays if it still holds changes not yet in the log. Returns how many tables
/// had triggers.
pub async fn uninstall_triggers(target: &Target) -> Result<usize, SetupError> {
    let client = crate::pg::connect(target, "setup").await?;
    let rows = client
        .query(
            "SELECT DISTINCT n.nspname::text, c.relname::text
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname = ANY($1) AND NOT t.tgisinternal AND t.tgparentid = 0",
            &[&CAPTURE_TRIGGERS.as_slice()],
        )
        .await?;
    for row in &rows {
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        client.batch_execute(&drop_triggers_sql(&table)).await?;
        tracing::info!(table = %table, "removed capture triggers");
    }
    client
        .batch_execute(
            "DROP FUNCTION IF EXISTS rowcast.capture() CASCADE;
             DROP FUNCTION IF EXISTS rowcast.install_capture(regclass, text, text);",
        )
        .await?;
    let pending: Option<i64> = client
        .query_one("SELECT CASE WHEN to_regclass('rowcast.outbox') IS NOT NULL THEN (SELECT count(*) FROM rowcast.outbox) END", &[])
        .await?
        .get(0);
    match pending {
        Some(0) => {
            client
                .batch_execute(
                    "DROP TABLE IF EXISTS rowcast.outbox, rowcast.outbox_commits;
                     DROP SEQUENCE IF EXISTS rowcast.commit_seq;
                     DROP FUNCTION IF EXISTS rowcast.stamp_commit() CASCADE;
                     DROP FUNCTION IF EXISTS rowcast.wake_lock()",
                )
                .await?;
        }
        Some(pending) => tracing::warn!(
            pending,
            "the outbox still holds changes not yet in the event log; kept it (run serve to drain it, then uninstall again)"
        ),
        None => {}
    }
    Ok(rows.len())
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
