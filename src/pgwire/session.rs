//! One Postgres-protocol connection: who it is (authentication sets the scope) and what its
//! statements do, through either query protocol.
//!
//! Authentication: with `--auth jwt` the server asks for a cleartext password and verifies it
//! as a token; its scope confines every statement as §6 confines a WebSocket subscription.
//! With `--auth none` (loopback only) everyone is trusted with everything. The user name and
//! database are not looked at.

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use futures_util::Sink;
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, PgWireConnectionState,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use super::peer::Peer;
use super::select::{self, Query};
use super::sql::{self, Column, Prepared, Session as Command, Statement};
use super::subscribe::{self, Subscription};
use super::{Context, error, fatal, rows, token_expired};
use crate::auth::Scope;
use crate::filter::Filter;

pub struct Session {
    context: Arc<Context>,
    peer: Peer,
    /// What the token grants, once authenticated.
    scope: Mutex<Option<Scope>>,
    /// Whether a `SUBSCRIBE` is running (shutdown gives it time to say so).
    subscribed: AtomicBool,
    parser: Arc<Parser>,
    keys: RandomPidSecretKeyGenerator,
}

impl Session {
    pub fn new(context: Arc<Context>, peer: Peer) -> Self {
        Self {
            context,
            peer,
            scope: Mutex::new(None),
            subscribed: AtomicBool::new(false),
            parser: Arc::new(Parser),
            keys: RandomPidSecretKeyGenerator::default(),
        }
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    pub fn cancels(&self) -> Arc<ConnectionManager> {
        self.context.cancels.clone()
    }

    /// The connection's scope, while its token is valid.
    fn scope(&self) -> PgWireResult<Scope> {
        let scope = self.scope.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(scope) = scope else {
            return Err(fatal("28000", "not authenticated"));
        };
        if scope.has_expired() {
            return Err(token_expired());
        }
        Ok(scope)
    }

    /// `filter` confined to the connection's scope (SPEC §6).
    fn confine(&self, filter: Filter, scope: &Scope) -> PgWireResult<Filter> {
        filter
            .check_redactions(self.context.mapping.redactions())
            .map_err(|err| error("0A000", err.to_string()))?;
        scope.confine(filter).map_err(|message| error("42501", message))
    }

    async fn authenticated<C>(&self, client: &mut C, scope: Scope) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<C::Error>,
    {
        *self.scope.lock().unwrap_or_else(PoisonError::into_inner) = Some(scope);
        let (pid, secret) = self.keys.generate(client);
        client.set_pid_and_secret_key(pid, secret.clone());
        // Cancel requests find the running query by these keys.
        let (handle, guard) = self.context.cancels.register(pid, secret);
        client.session_extensions().insert::<Arc<ConnectionHandle>>(handle);
        client.session_extensions().insert(guard);
        finish_authentication(client, &DefaultServerParameterProvider::default()).await
    }

    /// What `statement` answers; `SUBSCRIBE` writes its rows to `client` itself.
    async fn execute<C>(
        &self,
        client: &mut C,
        statement: &Statement,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: Sink<PgWireBackendMessage> + Unpin + Send,
        PgWireError: From<C::Error>,
    {
        match statement {
            Statement::Session(command) => Ok(match command {
                Command::Begin => Response::TransactionStart(Tag::new("BEGIN")),
                Command::Commit => Response::TransactionEnd(Tag::new("COMMIT")),
                Command::Rollback => Response::TransactionEnd(Tag::new("ROLLBACK")),
                Command::Set => Response::Execution(Tag::new("SET")),
            }),
            Statement::Select(select) => {
                let scope = self.scope()?;
                let filter = self.confine(select.conditions.filter.clone(), &scope)?;
                let fields = Arc::new(fields(&select.columns, format));
                let query = Query {
                    filter,
                    conditions: select.conditions.clone(),
                    columns: select.columns.clone(),
                    limit: select.limit,
                };
                let rows = select::rows(self.context.clone(), query, fields.clone());
                Ok(Response::Query(QueryResponse::new(fields, rows)))
            }
            Statement::Subscribe(subscribe) => {
                let scope = self.scope()?;
                let filter = self.confine(subscribe.filter.clone(), &scope)?;
                let subscription = Subscription {
                    filter,
                    severities: subscribe.severities,
                    since: subscribe.since,
                    token: scope,
                };
                // Cleared however the subscription ends (a cancel drops this future).
                let _subscribed = Flag::raise(&self.subscribed);
                Err(subscribe::run(client, &self.context, &self.peer, subscription).await)
            }
        }
    }
}

/// A flag raised while it lives.
struct Flag<'a>(&'a AtomicBool);

impl<'a> Flag<'a> {
    fn raise(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Flag(flag)
    }
}

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The row description of `columns` in the formats the driver asked for.
fn fields(columns: &[Column], format: &Format) -> Vec<FieldInfo> {
    rows::fields(columns, |i| format_of(format, i))
}

#[async_trait]
impl StartupHandler for Session {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use futures_util::SinkExt;
        match message {
            PgWireFrontendMessage::Startup(startup) => {
                protocol_negotiation(client, &startup).await?;
                save_startup_parameters_to_metadata(client, &startup);
                if self.context.limits.auth.is_required() {
                    client.set_state(PgWireConnectionState::AuthenticationInProgress);
                    let ask =
                        PgWireBackendMessage::Authentication(Authentication::CleartextPassword);
                    client.send(ask).await?;
                    Ok(())
                } else {
                    self.authenticated(client, Scope::everything()).await
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                if !matches!(client.state(), PgWireConnectionState::AuthenticationInProgress) {
                    return Err(fatal("08P01", "a password was not asked for"));
                }
                let token = password.into_password()?.password;
                match self.context.limits.auth.verify(Some(token.trim())) {
                    Ok(scope) => self.authenticated(client, scope).await,
                    Err(err) => Err(fatal(
                        "28P01",
                        format!(
                            "password authentication failed: {err} (the password is a rowcast token)"
                        ),
                    )),
                }
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Session {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = sql::parse(query).map_err(|err| error("0A000", err.0))?;
        let mut responses = Vec::with_capacity(statements.len());
        for statement in &statements {
            // A failed statement ends the string, as in Postgres; those before it stand.
            match self.execute(client, statement, &Format::UnifiedText).await {
                Ok(response) => responses.push(response),
                Err(PgWireError::UserError(info)) if !responses.is_empty() => {
                    responses.push(Response::Error(info));
                    break;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(responses)
    }
}

/// The most rows one Execute fetches from a portal (see `on_execute`).
const MAX_FETCH_ROWS: i32 = 10_000;

#[async_trait]
impl ExtendedQueryHandler for Session {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    /// The library reserves room for an Execute's row count before it fetches a portal's
    /// rows, so a client's huge count (or a negative one, read as a huge unsigned number) would
    /// abort the process on allocation. A count past [`MAX_FETCH_ROWS`] fetches that many, a
    /// negative one everything (as Postgres reads it); the client gets `PortalSuspended` and
    /// asks for the rest, as with any count.
    async fn on_execute<C>(&self, client: &mut C, mut message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        message.max_rows = message.max_rows.clamp(0, MAX_FETCH_ROWS);
        self._on_execute(client, message).await
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stored = &portal.statement;
        let prepared = &stored.statement;
        let values = portal
            .parameters
            .iter()
            .enumerate()
            .map(|(i, value)| {
                // The driver's declared type, else the one the statement's text implies.
                let declared = stored.parameter_types.get(i).cloned().flatten();
                let ty = declared
                    .filter(|t| *t != Type::UNKNOWN)
                    .or_else(|| prepared.types.get(i).cloned())
                    .unwrap_or(Type::TEXT);
                let binary = format_of(&portal.parameter_format, i) == FieldFormat::Binary;
                sql::literal(&ty, binary, value.as_deref())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| error("22P02", err.0))?;
        let statement = prepared.bind(&values).map_err(|err| error("0A000", err.0))?;
        self.execute(client, &statement, &portal.result_column_format).await
    }
}

/// The format of column or parameter `i`: text by default, and for those past the codes given.
fn format_of(format: &Format, i: usize) -> FieldFormat {
    match format {
        Format::UnifiedText => FieldFormat::Text,
        Format::UnifiedBinary => FieldFormat::Binary,
        Format::Individual(codes) => {
            codes.get(i).map_or(FieldFormat::Text, |c| FieldFormat::from(*c))
        }
    }
}

/// Reads statements for the extended protocol: one per `Parse`, as in Postgres, with `$n`
/// parameters typed by where they stand (see `sql::parameters`).
#[derive(Debug)]
pub struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        sql::prepare(sql).map_err(|err| error("0A000", err.0))
    }

    fn get_parameter_types(&self, prepared: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(prepared.types.clone())
    }

    fn get_result_schema(
        &self,
        prepared: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(match &prepared.shape {
            Statement::Select(select) => {
                fields(&select.columns, format.unwrap_or(&Format::UnifiedText))
            }
            Statement::Subscribe(_) | Statement::Session(_) => Vec::new(),
        })
    }
}
