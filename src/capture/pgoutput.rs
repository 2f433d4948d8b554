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

use bytes::{Buf, BufMut, Bytes, BytesMut};

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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("truncated {what}: needed {needed} bytes, {remaining} remaining")]
    Truncated { what: &'static str, needed: usize, remaining: usize },
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("unknown tuple column kind {0:#04x}")]
    UnknownTupleKind(u8),
    #[error("{context}: unexpected tuple marker {found:#04x}")]
    UnexpectedTupleMarker { context: &'static str, found: u8 },
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("{what} has no NUL terminator")]
    MissingNul { what: &'static str },
    #[error("{what} has negative length {len}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("unknown logical decoding message flags {0:#04x}")]
    UnknownMessageFlags(u8),
    #[error("{remaining} trailing bytes after a complete '{tag}' message")]
    TrailingBytes { tag: char, remaining: usize },
}

/// Smallest possible Relation column: flags, empty name (just its NUL), type oid, typmod.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
const MESSAGE_TRANSACTIONAL: u8 = 1;

/// Decodes one pgoutput message (the payload of an XLogData frame). Values are zero-copy
/// slices of `buf`.
pub fn decode(buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    use LogicalMessage as M;
    let mut r = Reader(buf);
    let tag = r.u8("message tag")?;
    // Struct literal fields are evaluated in source order, which here is wire order.
    let msg = match tag {
        b'B' => M::Begin {
            final_lsn: r.u64("begin final LSN")?,
            commit_time: r.i64("begin commit time")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => M::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("commit end LSN")?,
            commit_time: r.i64("commit time")?,
        },
        b'O' => {
            M::Origin { commit_lsn: r.u64("origin commit LSN")?, name: r.string("origin name")? }
        }
        b'R' => M::Relation(r.relation()?),
        b'Y' => M::Type {
            id: r.u32("type id")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.u32("insert relation id")?;
            r.marker(b"N", "insert")?;
            let new = r.tuple()?;
            M::Insert { relation, new }
        }
        b'U' => {
            let relation = r.u32("update relation id")?;
            let mut old = None;
            let marker = r.marker(b"KON", "update")?;
            if marker != b'N' {
                old = Some(old_tuple(marker, r.tuple()?));
                r.marker(b"N", "update")?;
            }
            let new = r.tuple()?;
            M::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32("delete relation id")?;
            let marker = r.marker(b"KO", "delete")?;
            let old = old_tuple(marker, r.tuple()?);
            M::Delete { relation, old }
        }
        b'T' => {
            let count = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            r.need(count.saturating_mul(4), "truncate relation ids")?;
            let relations =
                (0..count).map(|_| r.u32("truncate relation id")).collect::<Result<_, _>>()?;
            M::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            // Unknown bits would be lost by `transactional: bool`; refuse rather than guess.
            if flags & !MESSAGE_TRANSACTIONAL != 0 {
                return Err(DecodeError::UnknownMessageFlags(flags));
            }
            M::Message {
                transactional: flags & MESSAGE_TRANSACTIONAL != 0,
                lsn: r.u64("message LSN")?,
                prefix: r.string("message prefix")?,
                content: r.counted("message content")?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    let (tag, remaining) = (char::from(tag), r.0.remaining());
    if remaining > 0 {
        return Err(DecodeError::TrailingBytes { tag, remaining });
    }
    Ok(msg)
}

/// `marker` has already been checked to be 'K' or 'O'.
fn old_tuple(marker: u8, tuple: Tuple) -> OldTuple {
    match marker {
        b'K' => OldTuple::Key(tuple),
        _ => OldTuple::Full(tuple),
    }
}

/// Every read checks the remaining length first, so `Buf`'s panicking getters never fire.
struct Reader(Bytes);

impl Reader {
    fn need(&self, needed: usize, what: &'static str) -> Result<(), DecodeError> {
        let remaining = self.0.remaining();
        if remaining < needed {
            return Err(DecodeError::Truncated { what, needed, remaining });
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_i32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_i64())
    }

    /// The byte announcing which tuple follows ('K', 'O' or 'N').
    fn marker(&mut self, allowed: &[u8], context: &'static str) -> Result<u8, DecodeError> {
        match self.u8("tuple marker")? {
            found if allowed.contains(&found) => Ok(found),
            found => Err(DecodeError::UnexpectedTupleMarker { context, found }),
        }
    }

    /// Int32 length followed by that many bytes, shared with the input rather than copied.
    fn counted(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.i32(what)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })?;
        self.need(len, what)?;
        Ok(self.0.split_to(len))
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let nul = self.0.iter().position(|&b| b == 0).ok_or(DecodeError::MissingNul { what })?;
        let raw = self.0.split_to(nul);
        self.0.advance(1);
        std::str::from_utf8(&raw).map(str::to_owned).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("relation id")?;
        let namespace = self.string("relation namespace")?;
        let name = self.string("relation name")?;
        let replica_identity = self.u8("relation replica identity")?;
        let count = usize::from(self.u16("relation column count")?);
        self.need(count * MIN_COLUMN_LEN, "relation columns")?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(Column {
                flags: self.u8("column flags")?,
                name: self.string("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation { id, namespace, name, replica_identity, columns })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = usize::from(self.u16("tuple column count")?);
        // Each column takes at least its kind byte.
        self.need(count, "tuple columns")?;
        let mut datums = Vec::with_capacity(count);
        for _ in 0..count {
            datums.push(match self.u8("tuple column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => Datum::Text(self.counted("text value")?),
                b'b' => Datum::Binary(self.counted("binary value")?),
                kind => return Err(DecodeError::UnknownTupleKind(kind)),
            });
        }
        Ok(Tuple(datums))
    }
}

/// Encodes a message back into pgoutput bytes.
///
/// # Panics
///
/// On messages the wire format cannot carry (and the server never sends): a string with
/// an interior NUL, more than 65535 columns, more than `u32::MAX` truncated relations, or
/// a value longer than `i32::MAX` bytes. Producing bytes that decode differently would
/// be worse than failing loudly.
pub fn encode(msg: &LogicalMessage) -> Bytes {
    use LogicalMessage as M;
    let mut out = BytesMut::new();
    match msg {
        M::Begin { final_lsn, commit_time, xid } => {
            out.put_u8(b'B');
            out.put_u64(*final_lsn);
            out.put_i64(*commit_time);
            out.put_u32(*xid);
        }
        M::Commit { flags, commit_lsn, end_lsn, commit_time } => {
            out.put_u8(b'C');
            out.put_u8(*flags);
            out.put_u64(*commit_lsn);
            out.put_u64(*end_lsn);
            out.put_i64(*commit_time);
        }
        M::Origin { commit_lsn, name } => {
            out.put_u8(b'O');
            out.put_u64(*commit_lsn);
            put_string(&mut out, name);
        }
        M::Relation(rel) => {
            out.put_u8(b'R');
            out.put_u32(rel.id);
            put_string(&mut out, &rel.namespace);
            put_string(&mut out, &rel.name);
            out.put_u8(rel.replica_identity);
            out.put_u16(u16::try_from(rel.columns.len()).expect("at most 65535 columns"));
            for col in &rel.columns {
                out.put_u8(col.flags);
                put_string(&mut out, &col.name);
                out.put_u32(col.type_oid);
                out.put_i32(col.type_modifier);
            }
        }
        M::Type { id, namespace, name } => {
            out.put_u8(b'Y');
            out.put_u32(*id);
            put_string(&mut out, namespace);
            put_string(&mut out, name);
        }
        M::Insert { relation, new } => {
            out.put_u8(b'I');
            out.put_u32(*relation);
            out.put_u8(b'N');
            put_tuple(&mut out, new);
        }
        M::Update { relation, old, new } => {
            out.put_u8(b'U');
            out.put_u32(*relation);
            if let Some(old) = old {
                put_old_tuple(&mut out, old);
            }
            out.put_u8(b'N');
            put_tuple(&mut out, new);
        }
        M::Delete { relation, old } => {
            out.put_u8(b'D');
            out.put_u32(*relation);
            put_old_tuple(&mut out, old);
        }
        M::Truncate { options, relations } => {
            out.put_u8(b'T');
            out.put_u32(u32::try_from(relations.len()).expect("at most u32::MAX relations"));
            out.put_u8(*options);
            relations.iter().for_each(|id| out.put_u32(*id));
        }
        M::Message { transactional, lsn, prefix, content } => {
            out.put_u8(b'M');
            out.put_u8(MESSAGE_TRANSACTIONAL * u8::from(*transactional));
            out.put_u64(*lsn);
            put_string(&mut out, prefix);
            put_counted(&mut out, content);
        }
    }
    out.freeze()
}

fn put_string(out: &mut BytesMut, s: &str) {
    assert!(!s.contains('\0'), "pgoutput strings cannot contain NUL: {s:?}");
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_counted(out: &mut BytesMut, value: &[u8]) {
    out.put_i32(i32::try_from(value.len()).expect("value at most i32::MAX bytes"));
    out.put_slice(value);
}

fn put_old_tuple(out: &mut BytesMut, old: &OldTuple) {
    let (marker, tuple) = match old {
        OldTuple::Key(t) => (b'K', t),
        OldTuple::Full(t) => (b'O', t),
    };
    out.put_u8(marker);
    put_tuple(out, tuple);
}

fn put_tuple(out: &mut BytesMut, tuple: &Tuple) {
    out.put_u16(u16::try_from(tuple.0.len()).expect("at most 65535 columns"));
    for datum in &tuple.0 {
        match datum {
            Datum::Null => out.put_u8(b'n'),
            Datum::UnchangedToast => out.put_u8(b'u'),
            Datum::Text(v) => {
                out.put_u8(b't');
                put_counted(out, v);
            }
            Datum::Binary(v) => {
                out.put_u8(b'b');
                put_counted(out, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LogicalMessage as M;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Assembles wire bytes by hand, independently of `encode`.
    fn wire(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// A two-column 'K' tuple: the key column, then null for the non-key column.
    const KEY: &[u8] = b"\x00\x02t\x00\x00\x00\x017n";
    const NEW: &[u8] = b"\x00\x02t\x00\x00\x00\x018u";

    fn key() -> Tuple {
        Tuple(vec![text("7"), Datum::Null])
    }

    fn new() -> Tuple {
        Tuple(vec![text("8"), Datum::UnchangedToast])
    }

    /// Every message type, hand-assembled from the protocol description.
    fn cases() -> Vec<(&'static str, Bytes, LogicalMessage)> {
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

    #[test]
    fn begin_from_literal_bytes() {
        let bytes =
            b"B\x00\x00\x00\x01\x00\x00\x00\x28\x00\x02\x8b\x7c\x5f\x2e\x3a\x40\x00\x00\x02\xe5";
        let (final_lsn, commit_time, xid) = (0x1_0000_0028, 0x0002_8b7c_5f2e_3a40, 741);
        let expected = M::Begin { final_lsn, commit_time, xid };
        assert_eq!(decode(Bytes::from_static(bytes)), Ok(expected));
    }

    #[test]
    fn every_strict_prefix_of_hand_built_bytes_fails() {
        for (name, bytes, _) in cases() {
            for len in 0..bytes.len() {
                assert!(decode(bytes.slice(..len)).is_err(), "{name}: prefix {len}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for (name, bytes, _) in cases() {
            let tag = char::from(bytes[0]);
            let err = DecodeError::TrailingBytes { tag, remaining: 1 };
            assert_eq!(decode(wire(&[&bytes, b"\x00"])), Err(err), "{name}");
        }
    }

    #[test]
    fn datums_are_zero_copy() {
        let buf = wire(&[b"I\x00\x00\x00\x05N", NEW]);
        let Ok(M::Insert { new, .. }) = decode(buf.clone()) else { panic!("not an insert") };
        let Some(Datum::Text(value)) = new.0.first() else { panic!("not text") };
        assert!(buf.as_ptr_range().contains(&value.as_ptr()));
    }

    #[test]
    fn empty_input_and_unknown_tags() {
        let err = DecodeError::Truncated { what: "message tag", needed: 1, remaining: 0 };
        assert_eq!(decode(Bytes::new()), Err(err));
        for tag in (0..=u8::MAX).filter(|t| !b"BCORYIUDTM".contains(t)) {
            assert_eq!(decode(wire(&[&[tag], &[0; 32]])), Err(DecodeError::UnknownTag(tag)));
        }
    }

    #[test]
    fn unknown_tuple_kind_and_markers() {
        let kind = decode(wire(&[b"I\x00\x00\x00\x05N\x00\x01x"]));
        assert_eq!(kind, Err(DecodeError::UnknownTupleKind(b'x')));
        let cases: [(&[u8], &str, u8); 4] = [
            (b"I\x00\x00\x00\x05K\x00\x00", "insert", b'K'),
            (b"U\x00\x00\x00\x05X\x00\x00", "update", b'X'),
            (b"U\x00\x00\x00\x05K\x00\x00K\x00\x00", "update", b'K'),
            (b"D\x00\x00\x00\x05N\x00\x00", "delete", b'N'),
        ];
        for (bytes, context, found) in cases {
            let err = DecodeError::UnexpectedTupleMarker { context, found };
            assert_eq!(decode(wire(&[bytes])), Err(err));
        }
    }

    #[test]
    fn bad_utf8_missing_nul_and_unknown_flags() {
        let what = "origin name";
        let bad = decode(wire(&[b"O", &[0; 8], b"\xc3\x28\0"]));
        assert_eq!(bad, Err(DecodeError::InvalidUtf8 { what }));
        let what = "type name";
        let missing = decode(wire(&[b"Y\x00\x00\x00\x01public\0no_terminator"]));
        assert_eq!(missing, Err(DecodeError::MissingNul { what }));
        let flags = decode(wire(&[b"M\x02", &[0; 8], b"p\0\x00\x00\x00\x00"]));
        assert_eq!(flags, Err(DecodeError::UnknownMessageFlags(2)));
    }

    #[test]
    fn huge_declared_lengths_fail_fast() {
        let truncated =
            |what, needed, remaining| Err(DecodeError::Truncated { what, needed, remaining });
        let tuple = decode(wire(&[b"I\x00\x00\x00\x05N\xff\xffnnn"]));
        assert_eq!(tuple, truncated("tuple columns", 65535, 3));
        let rel = decode(wire(&[b"R\x00\x00\x00\x01\0t\0d\xff\xffabc"]));
        assert_eq!(rel, truncated("relation columns", 65535 * MIN_COLUMN_LEN, 3));
        let text = decode(wire(&[b"I\x00\x00\x00\x05N\x00\x01t\x7f\xff\xff\xffab"]));
        assert_eq!(text, truncated("text value", 0x7fff_ffff, 2));
        let content = decode(wire(&[b"M\x00", &[0; 8], b"p\0\x7f\x00\x00\x00x"]));
        assert_eq!(content, truncated("message content", 0x7f00_0000, 1));
        let truncate = decode(wire(&[b"T\xff\xff\xff\xff\x00\x00\x00\x00\x01"]));
        let needed = usize::try_from(u32::MAX).unwrap().saturating_mul(4);
        assert_eq!(truncate, truncated("truncate relation ids", needed, 4));
        let (what, len) = ("binary value", -1);
        let negative = decode(wire(&[b"I\x00\x00\x00\x05N\x00\x01b\xff\xff\xff\xff"]));
        assert_eq!(negative, Err(DecodeError::NegativeLength { what, len }));
    }

    fn arb_string() -> impl Strategy<Value = String> {
        let char = any::<char>().prop_filter("wire strings end at NUL", |c| *c != '\0');
        vec(char, 0..8).prop_map(String::from_iter)
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        let datum = prop_oneof![
            Just(Datum::Null),
            Just(Datum::UnchangedToast),
            arb_bytes().prop_map(Datum::Text),
            arb_bytes().prop_map(Datum::Binary),
        ];
        vec(datum, 0..6).prop_map(Tuple)
    }

    fn arb_old() -> impl Strategy<Value = OldTuple> {
        prop_oneof![arb_tuple().prop_map(OldTuple::Key), arb_tuple().prop_map(OldTuple::Full)]
    }

    fn arb_relation() -> impl Strategy<Value = Relation> {
        let column = (any::<u8>(), arb_string(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| Column {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        let head = (any::<u32>(), arb_string(), arb_string(), any::<u8>());
        (head, vec(column, 0..5)).prop_map(|((id, namespace, name, replica_identity), columns)| {
            Relation { id, namespace, name, replica_identity, columns }
        })
    }

    fn arb_message() -> impl Strategy<Value = LogicalMessage> {
        let (lsn, time) = (any::<u64>(), any::<i64>());
        prop_oneof![
            (lsn, time, any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| M::Begin {
                final_lsn,
                commit_time,
                xid
            }),
            (any::<u8>(), lsn, lsn, time).prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                M::Commit { flags, commit_lsn, end_lsn, commit_time }
            }),
            (lsn, arb_string()).prop_map(|(commit_lsn, name)| M::Origin { commit_lsn, name }),
            arb_relation().prop_map(M::Relation),
            (any::<u32>(), arb_string(), arb_string()).prop_map(|(id, namespace, name)| M::Type {
                id,
                namespace,
                name
            }),
            (any::<u32>(), arb_tuple()).prop_map(|(relation, new)| M::Insert { relation, new }),
            (any::<u32>(), proptest::option::of(arb_old()), arb_tuple())
                .prop_map(|(relation, old, new)| M::Update { relation, old, new }),
            (any::<u32>(), arb_old()).prop_map(|(relation, old)| M::Delete { relation, old }),
            (any::<u8>(), vec(any::<u32>(), 0..6))
                .prop_map(|(options, relations)| M::Truncate { options, relations }),
            (any::<bool>(), lsn, arb_string(), arb_bytes()).prop_map(
                |(transactional, lsn, prefix, content)| M::Message {
                    transactional,
                    lsn,
                    prefix,
                    content
                }
            ),
        ]
    }

    proptest! {
        // Cheap per case; more cases buy more coverage of the error paths.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn decode_never_panics_after_a_valid_tag(
            tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
            rest in vec(any::<u8>(), 0..256),
        ) {
            let _ = decode(wire(&[&[tag], &rest]));
        }

        #[test]
        fn round_trip(msg in arb_message()) {
            prop_assert_eq!(decode(encode(&msg)), Ok(msg));
        }

        #[test]
        fn every_strict_prefix_fails(msg in arb_message()) {
            let bytes = encode(&msg);
            for len in 0..bytes.len() {
                prop_assert!(decode(bytes.slice(..len)).is_err(), "prefix {} of {:?}", len, bytes);
            }
        }

        #[test]
        fn flipped_bytes_never_panic(
            msg in arb_message(),
            flips in vec((any::<prop::sample::Index>(), 1..=u8::MAX), 1..8),
        ) {
            let mut bytes = encode(&msg).to_vec();
            for (at, mask) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            let _ = decode(Bytes::from(bytes));
        }
    }
}
