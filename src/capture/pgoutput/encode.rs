//! [`LogicalMessage`] -> pgoutput bytes, the inverse of `decode`: benchmarks and tests build
//! their input with it.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Datum, LogicalMessage, MESSAGE_TRANSACTIONAL, OldTuple, Tuple};

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
    use crate::capture::pgoutput::{Column, Relation, decode};
    use LogicalMessage as M;
    use proptest::collection::vec;
    use proptest::prelude::*;

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
