//! The SQL the Postgres-protocol endpoint understands (SPEC §11), compiled to a [`Filter`] and
//! a range of ids and commit times. Pure: text in, a [`Statement`] or an [`Unsupported`] out.
//!
//! ```text
//!   SELECT * | col, ... FROM events [WHERE cond AND ...] [ORDER BY id [ASC]] [LIMIT n]
//!   COPY (SUBSCRIBE [TO] events [WHERE cond AND ...] [SINCE n]) TO STDOUT
//!   BEGIN | START TRANSACTION | COMMIT | END | ROLLBACK | ABORT | SET ...   (accepted, no effect)
//!
//!   cond:  type = 'e.a' | type IN ('e.a', ...) | type LIKE 'e.%' | '%.a' | '%' | 'e.a'
//!          organization_id | domain_id  = 'x' | IN ('x', ...)
//!          severity  = | <> | < | <= | > | >= 'warning' | [NOT] IN ('error', ...)
//!          id  = | > | >= | < | <= n | BETWEEN n AND m                    (SELECT only)
//!          timestamp  = | > | >= | < | <= 'RFC 3339' | BETWEEN ... AND ... (SELECT only)
//!          data->>'k' | data->'k'->>'k2' | old->>'k'   = | <> | < | <= | > | >= literal
//!                     | [NOT] IN (literal, ...) | IS [NOT] NULL | LIKE '%text%'
//!          changed ? 'k'
//! ```
//!
//! In the extended protocol a literal may be a parameter (`$n`, see `parameters.rs`).
//! Conditions are joined with `AND` (alternatives are `IN` lists); a literal is a string, a
//! number or a boolean and compares with the JSON value as the `where` predicates of §5 do
//! (numbers as numbers, strings as strings). `LIKE` on `type` reads `_` as itself, since
//! event types use it in names. The text is tokenized and its expressions parsed by
//! `sqlparser` (Postgres dialect, bounded recursion); everything outside this grammar is an
//! [`Unsupported`] that names the part not understood, never a panic.

use sqlparser::ast::Expr;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::filter::Filter;

mod condition;
mod parameters;

pub use parameters::literal;

use condition::Builder;
pub use condition::{Conditions, Severities};

/// How deep an expression may nest; far more than the grammar needs, far less than the stack.
const MAX_DEPTH: usize = 32;
/// The longest statement read; drivers send short ones, and tokens are kept in memory.
pub const MAX_SQL_BYTES: usize = 64 << 10;

/// The most operators (`AND`, `OR`, `NOT`, comparisons, arithmetic, `->`...) in one query
/// string: far more than a filter of many conditions needs (values in an `IN` list are not
/// operators), and few enough that the deepest expression they can make is walked on a small
/// thread stack.
pub const MAX_OPERATORS: usize = 256;

/// SQL this endpoint does not understand (SQLSTATE 0A000), saying which part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

fn unsupported<T>(message: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(message.into()))
}

/// One statement of the subset.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    Select(Select),
    Subscribe(Subscribe),
    /// Transaction and session commands drivers send on their own; answered, no effect.
    Session(Session),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    Begin,
    Commit,
    Rollback,
    Set,
}

/// `SELECT ... FROM events`: history.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    pub columns: Vec<Column>,
    pub conditions: Conditions,
    pub limit: Option<u64>,
}

/// `COPY (SUBSCRIBE TO events ...) TO STDOUT`: history after `since`, then live events.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub filter: Filter,
    pub severities: Severities,
    pub since: Option<u64>,
}

/// The columns of `events`, in `SELECT *` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Id,
    Type,
    Timestamp,
    OrganizationId,
    DomainId,
    Severity,
    Data,
    Old,
    Changed,
    Source,
}

impl Column {
    pub const ALL: [Column; 10] = [
        Column::Id,
        Column::Type,
        Column::Timestamp,
        Column::OrganizationId,
        Column::DomainId,
        Column::Severity,
        Column::Data,
        Column::Old,
        Column::Changed,
        Column::Source,
    ];

    /// Its name, which is also the envelope's key.
    pub fn name(self) -> &'static str {
        match self {
            Column::Id => "id",
            Column::Type => "type",
            Column::Timestamp => "timestamp",
            Column::OrganizationId => "organization_id",
            Column::DomainId => "domain_id",
            Column::Severity => "severity",
            Column::Data => "data",
            Column::Old => "old",
            Column::Changed => "changed",
            Column::Source => "source",
        }
    }

    fn named(name: &str) -> Option<Column> {
        Column::ALL.into_iter().find(|c| c.name().eq_ignore_ascii_case(name))
    }
}

fn column_list() -> String {
    Column::ALL.map(Column::name).join(", ")
}

/// Parses `sql` into its statements (drivers may send several, separated by `;`). Parameters
/// (`$1`) are for the extended protocol: [`prepare`].
pub fn parse(sql: &str) -> Result<Vec<Statement>, Unsupported> {
    let tokens = tokenize(sql)?;
    if let Some(parameter) = tokens.iter().find(|t| matches!(t, Token::Placeholder(_))) {
        return unsupported(format!(
            "the parameter {parameter} in a simple query: write the value into the statement"
        ));
    }
    statements(tokens)
}

/// A statement of the extended protocol, read when it is parsed; its parameters, if it has
/// any, are bound before it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The statement as it reads with a placeholder value for each parameter: its columns.
    pub shape: Statement,
    /// The type of each parameter, `$1` first.
    pub types: Vec<tokio_postgres::types::Type>,
    tokens: Vec<Token>,
}

/// Reads one statement of the extended protocol (`None`: an empty one).
pub fn prepare(sql: &str) -> Result<Option<Prepared>, Unsupported> {
    let tokens = tokenize(sql)?;
    let inferred = parameters::infer(&tokens)?;
    let (types, placeholders): (Vec<_>, Vec<_>) = inferred.into_iter().unzip();
    let mut shapes = statements(substitute(&tokens, &placeholders)?)?;
    if shapes.len() > 1 {
        return unsupported("several statements in one prepared statement");
    }
    Ok(shapes.pop().map(|shape| Prepared { shape, types, tokens }))
}

impl Prepared {
    /// The statement with `values` (literal tokens, `$1` first) in place of its parameters.
    pub fn bind(&self, values: &[Token]) -> Result<Statement, Unsupported> {
        if values.len() != self.types.len() {
            return unsupported(format!(
                "{} parameters bound where the statement has {}",
                values.len(),
                self.types.len()
            ));
        }
        if values.is_empty() {
            return Ok(self.shape.clone());
        }
        let mut bound = statements(substitute(&self.tokens, values)?)?;
        match bound.pop() {
            Some(statement) if bound.is_empty() => Ok(statement),
            _ => unsupported("a prepared statement that is not one statement"),
        }
    }
}

/// Whether `token` joins expressions into a deeper one: a binary or unary operator.
fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(word) => matches!(word.keyword, Keyword::AND | Keyword::OR | Keyword::NOT),
        Token::Whitespace(_)
        | Token::Number(..)
        | Token::Char(_)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::NationalStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::Placeholder(_)
        | Token::Comma
        | Token::LParen
        | Token::RParen
        | Token::Period
        | Token::SemiColon
        | Token::EOF => false,
        _ => true,
    }
}

/// `tokens` with each `$n` replaced by `values[n - 1]`.
fn substitute(tokens: &[Token], values: &[Token]) -> Result<Vec<Token>, Unsupported> {
    tokens
        .iter()
        .map(|token| match parameters::number(token) {
            Some(n) => values
                .get(n - 1)
                .cloned()
                .ok_or_else(|| Unsupported(format!("no value for the parameter {token}"))),
            None => Ok(token.clone()),
        })
        .collect()
}

fn tokenize(sql: &str) -> Result<Vec<Token>, Unsupported> {
    if sql.len() > MAX_SQL_BYTES {
        return unsupported(format!("statements longer than {MAX_SQL_BYTES} bytes"));
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|err| Unsupported(format!("could not read the statement: {err}")))?;
    // The parser's recursion limit bounds nesting, not chains: `a AND b AND ...` or
    // `1 + 1 + ...` is built as a tree as deep as it is long, which compiling it, printing it
    // and dropping it each walk recursively. Bounding the tokens bounds every such tree.
    let operators = tokens.iter().filter(|t| is_operator(t)).count();
    if operators > MAX_OPERATORS {
        return unsupported(format!("statements with more than {MAX_OPERATORS} operators"));
    }
    Ok(tokens)
}

fn statements(tokens: Vec<Token>) -> Result<Vec<Statement>, Unsupported> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).with_recursion_limit(MAX_DEPTH).with_tokens(tokens);
    let mut statements = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token_ref().token == Token::EOF {
            return Ok(statements);
        }
        statements.push(statement(&mut parser)?);
        let next = parser.peek_token();
        if next.token != Token::SemiColon && next.token != Token::EOF {
            return unsupported(format!("did not understand {} here", next.token));
        }
    }
}

fn statement(parser: &mut Parser<'_>) -> Result<Statement, Unsupported> {
    let first = parser.next_token().token;
    let Token::Word(word) = &first else {
        return unsupported(format!("did not understand a statement starting with {first}"));
    };
    match word.keyword {
        Keyword::SELECT => select(parser).map(Statement::Select),
        Keyword::COPY => subscribe(parser).map(Statement::Subscribe),
        Keyword::BEGIN | Keyword::START => session(parser, Session::Begin),
        Keyword::COMMIT | Keyword::END => session(parser, Session::Commit),
        Keyword::ROLLBACK | Keyword::ABORT => session(parser, Session::Rollback),
        Keyword::SET => session(parser, Session::Set),
        _ if word.value.eq_ignore_ascii_case("subscribe") => unsupported(
            "SUBSCRIBE streams through COPY: COPY (SUBSCRIBE TO events WHERE ... SINCE n) TO STDOUT",
        ),
        _ => unsupported(format!(
            "{} statements; this endpoint answers SELECT ... FROM events and COPY (SUBSCRIBE TO events ...) TO STDOUT",
            word.value.to_uppercase()
        )),
    }
}

/// Skips the rest of a session command: its words mean nothing to an event log.
fn session(parser: &mut Parser<'_>, session: Session) -> Result<Statement, Unsupported> {
    loop {
        match parser.peek_token_ref().token {
            Token::SemiColon | Token::EOF => return Ok(Statement::Session(session)),
            _ => {
                parser.next_token();
            }
        }
    }
}

fn expected(parser: &Parser<'_>, what: &str) -> Unsupported {
    let found = parser.peek_token();
    let found = match found.token {
        Token::EOF => "the end".to_owned(),
        other => other.to_string(),
    };
    Unsupported(format!("expected {what}, found {found}"))
}

fn select(parser: &mut Parser<'_>) -> Result<Select, Unsupported> {
    let columns = if parser.consume_token(&Token::Mul) {
        Column::ALL.to_vec()
    } else {
        let mut columns = Vec::new();
        loop {
            let Token::Word(word) = parser.next_token().token else {
                return Err(expected(parser, &format!("a column ({})", column_list())));
            };
            let Some(column) = Column::named(&word.value) else {
                return unsupported(format!(
                    "column {:?}: events has the columns {}",
                    word.value,
                    column_list()
                ));
            };
            columns.push(column);
            if !parser.consume_token(&Token::Comma) {
                break;
            }
        }
        columns
    };
    if !parser.parse_keyword(Keyword::FROM) {
        return Err(expected(parser, "FROM events (columns are plain names, no expressions)"));
    }
    table(parser)?;
    let mut builder = Builder::new(true);
    if parser.parse_keyword(Keyword::WHERE) {
        let condition = expression(parser)?;
        builder.condition(&condition)?;
    }
    if parser.parse_keywords(&[Keyword::ORDER, Keyword::BY]) {
        let by = parser.next_token().token;
        let by_id = matches!(&by, Token::Word(w) if w.value.eq_ignore_ascii_case("id"));
        if !by_id {
            return unsupported(format!("ORDER BY {by}: events come in id order (ORDER BY id)"));
        }
        if parser.parse_keyword(Keyword::DESC) {
            return unsupported("ORDER BY id DESC: events come in id order, oldest first");
        }
        // ASC is the order anyway.
        let _ = parser.parse_keyword(Keyword::ASC);
    }
    let limit = if parser.parse_keyword(Keyword::LIMIT) {
        Some(parser.parse_literal_uint().map_err(|_| expected(parser, "a number after LIMIT"))?)
    } else {
        None
    };
    Ok(Select { columns, conditions: builder.finish()?, limit })
}

fn table(parser: &mut Parser<'_>) -> Result<(), Unsupported> {
    let name = parser.next_token().token;
    match &name {
        Token::Word(word) if word.value.eq_ignore_ascii_case("events") => Ok(()),
        _ => unsupported(format!("table {name}: the only table is events")),
    }
}

fn expression(parser: &mut Parser<'_>) -> Result<Expr, Unsupported> {
    parser.parse_expr().map_err(|err| Unsupported(format!("could not read the condition: {err}")))
}

fn word_is(parser: &mut Parser<'_>, expected: &str) -> bool {
    let found = matches!(&parser.peek_token_ref().token, Token::Word(w) if w.value.eq_ignore_ascii_case(expected));
    if found {
        parser.next_token();
    }
    found
}

fn subscribe(parser: &mut Parser<'_>) -> Result<Subscribe, Unsupported> {
    let usage = "COPY (SUBSCRIBE TO events [WHERE ...] [SINCE n]) TO STDOUT";
    if !parser.consume_token(&Token::LParen) || !word_is(parser, "subscribe") {
        return unsupported(format!("COPY other than {usage}"));
    }
    // `SUBSCRIBE events` reads as well as `SUBSCRIBE TO events`.
    let _ = parser.parse_keyword(Keyword::TO);
    table(parser)?;
    let mut builder = Builder::new(false);
    if parser.parse_keyword(Keyword::WHERE) {
        let condition = expression(parser)?;
        builder.condition(&condition)?;
    }
    let since = if word_is(parser, "since") {
        Some(parser.parse_literal_uint().map_err(|_| expected(parser, "an event id after SINCE"))?)
    } else {
        None
    };
    if !parser.consume_token(&Token::RParen) {
        return Err(expected(parser, &format!("SINCE n or ) in {usage}")));
    }
    if !parser.parse_keyword(Keyword::TO) || !parser.parse_keyword(Keyword::STDOUT) {
        return Err(expected(parser, &format!("TO STDOUT in {usage}")));
    }
    let conditions = builder.finish()?;
    Ok(Subscribe { filter: conditions.filter, severities: conditions.severities, since })
}

#[cfg(test)]
mod tests;
