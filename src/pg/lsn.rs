//! A WAL position: 64 bits, written by Postgres as two hexadecimal halves (`16/B374D848`).

/// A WAL position (log sequence number).
pub type Lsn = u64;

/// `0/16B3748`, as Postgres prints it.
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The inverse of [`format_lsn`]; `None` for anything else.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (high, low) = text.split_once('/')?;
    let high = u32::from_str_radix(high, 16).ok()?;
    let low = u32::from_str_radix(low, 16).ok()?;
    Some((u64::from(high) << 32) | u64::from(low))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(format_lsn(0x16B3748), "0/16B3748");
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1A/0"), Some(0x1A << 32));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/"), None);
    }
}
