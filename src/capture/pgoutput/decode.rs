//! pgoutput bytes -> [`LogicalMessage`], with a checked read for every field.

use bytes::{Buf, Bytes};

use super::{Column, Datum, LogicalMessage, MESSAGE_TRANSACTIONAL, OldTuple, Relation, Tuple};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::pgoutput::tests::{NEW, cases, wire};
    use LogicalMessage as M;
    use proptest::collection::vec;
    use proptest::prelude::*;

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
    }
}
