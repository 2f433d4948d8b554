//! Decoder for the `pgoutput` logical replication plugin, protocol version 1
//! (no streaming, no two-phase), as described in the PostgreSQL 15 docs under
//! "Logical Replication Message Formats".
//!
//! Each XLogData frame carries one message. A transaction arrives as:
//!
//! 1. `Begin`, then optionally `Origin` if the change was itself replicated in;
//! 2. `Relation` (and `Type` for non-built-in column types) before the first change that uses
//!    that relation in this session, and again whenever its definition changes — so the
//!    consumer must keep a relation cache keyed by id, not expect one per transaction;
//! 3. `Insert` / `Update` / `Delete` / `Truncate` / transactional `Message`s;
//! 4. `Commit`.
//!
//! Non-transactional `Message`s can arrive between transactions.
//!
//! LSNs: `Begin.final_lsn` is the LSN of the commit record and equals `Commit.commit_lsn`
//! (decoding only starts once the transaction committed, which is also why Begin already
//! knows the commit time). `Commit.end_lsn` points just past the commit record; it is the
//! value a client reports as flushed so the slot can release WAL. `Origin.commit_lsn` is
//! the commit LSN on the origin server, and `Message.lsn` is the message's own record.
//!
//! Guarantees: [`decode`] never panics on any input, allocates only in proportion to bytes
//! actually present (declared counts are checked against the remaining input first), and
//! rejects trailing bytes so corruption shows up as an error rather than as silently
//! dropped data. Column values and message content are zero-copy slices of the input
//! [`Bytes`]; holding one keeps the whole frame alive. Names are copied into `String`s
//! because they must be validated as UTF-8 anyway.
//!
//! `decode.rs` reads messages; `encode.rs` writes them back, for tests and benchmarks (the
//! server is the only writer in production).

use bytes::Bytes;

mod decode;
mod encode;

pub use self::decode::{DecodeError, decode};
pub use self::encode::encode;
pub use crate::pg::Lsn;

#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01 (the PostgreSQL epoch).
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    /// `options`: 1 = CASCADE, 2 = RESTART IDENTITY.
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// An empty `namespace` means `pg_catalog`; it is kept as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `d`efault, `n`othing, `f`ull or `i`ndex.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// 1 = part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// `Key` ('K') has the same columns as the Relation message, with every column outside the
/// replica identity sent as null; `Full` ('O') is the whole old row (REPLICA IDENTITY FULL).
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    Key(Tuple),
    Full(Tuple),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tuple(pub Vec<Datum>);

#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value the change did not touch; the server does not resend it.
    UnchangedToast,
    /// Type output function text, in the database encoding (not validated as UTF-8).
    Text(Bytes),
    Binary(Bytes),
}

const MESSAGE_TRANSACTIONAL: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use LogicalMessage as M;

    /// Assembles wire bytes by hand, independently of `encode`.
    pub(super) fn wire(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    pub(super) fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// A two-column 'K' tuple: the key column, then null for the non-key column.
    pub(super) const KEY: &[u8] = b"\x00\x02t\x00\x00\x00\x017n";
    pub(super) const NEW: &[u8] = b"\x00\x02t\x00\x00\x00\x018u";

    fn key() -> Tuple {
        Tuple(vec![text("7"), Datum::Null])
    }

    fn new() -> Tuple {
        Tuple(vec![text("8"), Datum::UnchangedToast])
    }

    /// Every message type, hand-assembled from the protocol description.
    pub(super) fn cases() -> Vec<(&'static str, Bytes, LogicalMessage)> {
        let column = |flags, name: &str, type_oid, type_modifier| Column {
            flags,
            name: name.into(),
            type_oid,
            type_modifier,
        };
        let relation = Relation {
            id: 16385,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![column(1, "id", 23, -1), column(0, "name", 1043, 68)],
        };
        let all_kinds = Tuple(vec![
            text("42"),
            Datum::Null,
            Datum::UnchangedToast,
            Datum::Binary(Bytes::from_static(b"\xff")),
        ]);
        let (lsn7, lsn9, time) = (7u64.to_be_bytes(), 9u64.to_be_bytes(), (-5i64).to_be_bytes());
        let begin = M::Begin { final_lsn: 7, commit_time: -5, xid: 9 };
        let commit = M::Commit { flags: 0, commit_lsn: 7, end_lsn: 9, commit_time: -5 };
        let update = |old| M::Update { relation: 5, old, new: new() };
        let delete = |old| M::Delete { relation: 5, old };
        let message = |transactional, prefix: &str, content| M::Message {
            transactional,
            lsn: 7,
            prefix: prefix.into(),
            content: Bytes::from_static(content),
        };
        vec![
            ("begin", wire(&[b"B", &lsn7, &time, b"\x00\x00\x00\x09"]), begin),
            ("commit", wire(&[b"C\x00", &lsn7, &lsn9, &time]), commit),
            (
                "origin",
                wire(&[b"O", &lsn7, "nœud\0".as_bytes()]),
                M::Origin { commit_lsn: 7, name: "nœud".into() },
            ),
            (
                "relation",
                wire(&[
                    b"R\x00\x00\x40\x01public\0users\0d\x00\x02",
                    b"\x01id\0\x00\x00\x00\x17\xff\xff\xff\xff",
                    b"\x00name\0\x00\x00\x04\x13\x00\x00\x00\x44",
                ]),
                M::Relation(relation),
            ),
            (
                "type in pg_catalog keeps the empty namespace",
                wire(&[b"Y\x00\x00\x80\x00\0mood\0"]),
                M::Type { id: 32768, namespace: String::new(), name: "mood".into() },
            ),
            (
                "insert with every column kind",
                wire(&[b"I\x00\x00\x40\x00N\x00\x04t\x00\x00\x00\x0242nub\x00\x00\x00\x01\xff"]),
                M::Insert { relation: 16384, new: all_kinds },
            ),
            (
                "insert of an empty tuple",
                wire(&[b"I\x00\x00\x00\x05N\x00\x00"]),
                M::Insert { relation: 5, new: Tuple::default() },
            ),
            (
                "update with key",
                wire(&[b"U\x00\x00\x00\x05K", KEY, b"N", NEW]),
                update(Some(OldTuple::Key(key()))),
            ),
            (
                "update with old tuple",
                wire(&[b"U\x00\x00\x00\x05O", KEY, b"N", NEW]),
                update(Some(OldTuple::Full(key()))),
            ),
            ("update without old", wire(&[b"U\x00\x00\x00\x05N", NEW]), update(None)),
            ("delete with key", wire(&[b"D\x00\x00\x00\x05K", KEY]), delete(OldTuple::Key(key()))),
            ("delete with old", wire(&[b"D\x00\x00\x00\x05O", KEY]), delete(OldTuple::Full(key()))),
            (
                "truncate of three relations",
                wire(&[b"T\x00\x00\x00\x03\x03\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x40\x00"]),
                M::Truncate { options: 3, relations: vec![1, 2, 16384] },
            ),
            (
                "transactional message with binary content",
                wire(&[b"M\x01", &lsn7, b"rowcast\0\x00\x00\x00\x04\x00\xff\x00\x80"]),
                message(true, "rowcast", b"\x00\xff\x00\x80"),
            ),
            (
                "empty non-transactional message",
                wire(&[b"M\x00", &lsn7, b"\0\x00\x00\x00\x00"]),
                message(false, "", b""),
            ),
        ]
    }

    #[test]
    fn hand_built_bytes_decode_and_encode() {
        for (name, bytes, expected) in cases() {
            assert_eq!(decode(bytes.clone()).as_ref(), Ok(&expected), "{name}");
            assert_eq!(encode(&expected), bytes, "{name}");
        }
    }
}
