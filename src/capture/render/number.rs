//! Numbers: `numeric_out(numeric_in(text))`, the form jsonb stores every number in, whether
//! it comes from a number column or from inside json.

use serde_json::{Number, Value};

use super::{RenderError, is_pg_space, snippet};

/// numeric's NUMERIC_DSCALE_MAX.
const NUMERIC_DSCALE_MAX: i64 = 16383;
/// numeric's weight limit (32767 base-10000 digits) as decimal digits before the point.
const NUMERIC_INT_DIGITS_MAX: i64 = 131_072;

#[derive(Debug, PartialEq)]
pub(super) enum NumericError {
    /// Not something numeric_in accepts.
    Syntax,
    /// numeric_in would fail with "value overflows numeric format".
    Overflow,
}

pub(super) fn render_number(text: &str) -> Result<Value, RenderError> {
    if is_special_number(text) {
        return Ok(Value::String(text.to_owned()));
    }
    match numeric_normalize(text) {
        Ok(digits) => number_value(&digits),
        // Postgres would error here; keeping the text loses nothing.
        Err(NumericError::Overflow) => Ok(Value::String(text.to_owned())),
        Err(NumericError::Syntax) => Err(RenderError::BadNumber(snippet(text.as_bytes()))),
    }
}

/// NaN and infinities, spelled as numeric_in accepts them; jsonb can only hold them as strings.
fn is_special_number(text: &str) -> bool {
    const SPELLINGS: [&str; 7] =
        ["NaN", "Infinity", "+Infinity", "-Infinity", "inf", "+inf", "-inf"];
    SPELLINGS.iter().any(|s| text.eq_ignore_ascii_case(s))
}

pub(super) fn number_value(digits: &str) -> Result<Value, RenderError> {
    digits
        .parse::<Number>()
        .map(Value::Number)
        .map_err(|_| RenderError::BadNumber(snippet(digits.as_bytes())))
}

/// `numeric_out(numeric_in(text))` for finite values: the exact decimal expansion with
/// `max(0, fraction digits - exponent)` fraction digits, no leading zeros, and no sign on zero.
pub(super) fn numeric_normalize(text: &str) -> Result<String, NumericError> {
    let mut rest = text.trim_matches(|c: char| c.is_ascii() && is_pg_space(c as u8)).as_bytes();
    let negative = take_sign(&mut rest);
    let int_digits = take_digits(&mut rest);
    let frac_digits = match rest.split_first() {
        Some((b'.', tail)) => {
            rest = tail;
            take_digits(&mut rest)
        }
        _ => &[],
    };
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(NumericError::Syntax);
    }
    let mut exponent: i64 = 0;
    if let Some((b'e' | b'E', tail)) = rest.split_first() {
        rest = tail;
        let exp_negative = take_sign(&mut rest);
        let exp_digits = take_digits(&mut rest);
        if exp_digits.is_empty() {
            return Err(NumericError::Syntax);
        }
        // Saturating keeps absurd exponents bounded; they are rejected just below anyway.
        exponent = exp_digits
            .iter()
            .fold(0, |e: i64, d| e.saturating_mul(10).saturating_add(i64::from(d - b'0')));
        if exp_negative {
            exponent = -exponent;
        }
    }
    if !rest.is_empty() {
        return Err(NumericError::Syntax);
    }
    // numeric_in's own bound on the exponent.
    if exponent.abs() >= i64::from(i32::MAX / 2) {
        return Err(NumericError::Overflow);
    }

    let digits: Vec<u8> = int_digits.iter().chain(frac_digits).copied().collect();
    // Positions left of the first digit or right of the last one are implied zeros.
    let digit_at = |pos: i64| {
        let digit = usize::try_from(pos).ok().and_then(|p| digits.get(p));
        digit.map_or('0', |&d| char::from(d))
    };
    // Where the decimal point falls, counted in digits from the first one written.
    let point = int_digits.len() as i64 + exponent;
    let dscale = (frac_digits.len() as i64 - exponent).max(0);
    if dscale > NUMERIC_DSCALE_MAX {
        return Err(NumericError::Overflow);
    }
    let first_nonzero = digits.iter().position(|&d| d != b'0').map(|p| p as i64);
    let int_len = first_nonzero.map_or(0, |first| point - first);
    if int_len > NUMERIC_INT_DIGITS_MAX {
        return Err(NumericError::Overflow);
    }

    let mut out = String::with_capacity((int_len.max(1) + dscale + 2) as usize);
    if negative && first_nonzero.is_some() {
        out.push('-');
    }
    match first_nonzero {
        Some(first) if int_len > 0 => out.extend((first..point).map(digit_at)),
        _ => out.push('0'),
    }
    if dscale > 0 {
        out.push('.');
        out.extend((point..point + dscale).map(digit_at));
    }
    Ok(out)
}

fn take_sign(rest: &mut &[u8]) -> bool {
    match rest.split_first() {
        Some((b'-', tail)) => {
            *rest = tail;
            true
        }
        Some((b'+', tail)) => {
            *rest = tail;
            false
        }
        _ => false,
    }
}

fn take_digits<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (digits, tail) = rest.split_at(n);
    *rest = tail;
    digits
}

#[cfg(test)]
mod tests {
    //! The pairs below were observed on PostgreSQL 15, as described in `render::tests`.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::capture::render::tests::{check, check_fails, check_lines};
    use crate::capture::render::{Category, render};
    use proptest::prelude::*;

    #[test]
    fn numbers() {
        check_lines(
            &Category::Number,
            r#"NaN => "NaN"
            Infinity => "Infinity"
            -Infinity => "-Infinity"
            1.5e-07 => 0.00000015
            -0 => 0
            1e-05 => 0.00001
            0.1 => 0.1
            1.2345679e+08 => 123456790
            1e+20 => 100000000000000000000
            3.4028235e+38 => 340282350000000000000000000000000000000
            -12345.6 => -12345.6
            1234567890123456789012345678901234567890 => 1234567890123456789012345678901234567890
            1.50 => 1.50
            0.000 => 0.000
            -9223372036854775808 => -9223372036854775808"#,
        );
        let zeros = |n| "0".repeat(n);
        check(&Category::Number, "1e+100", &format!("1{}", zeros(100)));
        check(&Category::Number, "5e-324", &format!("0.{}5", zeros(323)));
        check(
            &Category::Number,
            "1.7976931348623157e+308",
            &format!("17976931348623157{}", zeros(292)),
        );
        // Beyond numeric's range Postgres errors; the text is kept.
        check(&Category::Number, "1e131072", r#""1e131072""#);
        check_fails(
            &Category::Number,
            r#"12abc
            -nan
            0x1F"#,
        );
        assert!(render(b"", &Category::Number).is_err());
    }

    #[test]
    fn numeric_normalize_edges() {
        let n = numeric_normalize;
        for (text, want) in [
            ("1.0e2", "100"),
            ("1E-2", "0.01"),
            ("12.34e-1", "1.234"),
            ("0.000e5", "0"),
            ("-0.0", "0.0"),
            ("-0.05", "-0.05"),
            ("007.50", "7.50"),
            ("+.5", "0.5"),
            ("5.", "5"),
            (" 42 ", "42"),
            ("0e200000", "0"),
        ] {
            assert_eq!(n(text).unwrap(), want, "{text}");
        }
        // The limits observed on the server: 1e131071 and 1e-16383 work, one step more does not.
        assert_eq!(n("1e131071").unwrap().len(), 131_072);
        assert_eq!(n("1e-16383").unwrap().len(), 16_385);
        for text in [
            "1e131072",
            "1e-16384",
            "1.5e-16383",
            "0e-16384",
            "1e1073741823",
            "1e99999999999999999999",
        ] {
            assert_eq!(n(text), Err(NumericError::Overflow), "{text}");
        }
        for text in ["", "-", ".", "e5", "1e", "1e+", "1.2.3", "0x10", "1_000", "--1", "١"] {
            assert_eq!(n(text), Err(NumericError::Syntax), "{text}");
        }
    }

    /// Expands mantissa × 10^exponent by scaling to an integer and placing the point from the
    /// right, unlike the implementation, which walks digit positions from the left.
    fn reference(negative: bool, int: &str, frac: &str, exponent: i64) -> String {
        let dscale = (frac.len() as i64 - exponent).max(0);
        let zeros = exponent - frac.len() as i64 + dscale;
        let scaled = format!("{int}{frac}{}", "0".repeat(zeros as usize));
        let scaled = scaled.trim_start_matches('0');
        let padded = format!("{scaled:0>width$}", width = dscale as usize + 1);
        let (i, f) = padded.split_at(padded.len() - dscale as usize);
        let body = if f.is_empty() { i.to_string() } else { format!("{i}.{f}") };
        if negative && !scaled.is_empty() { format!("-{body}") } else { body }
    }

    proptest! {
        #[test]
        fn numeric_matches_reference(
            negative in any::<bool>(),
            int in "[0-9]{0,12}",
            frac in prop::option::of("[0-9]{0,12}"),
            exponent in prop::option::of(-40i64..40),
        ) {
            let frac_digits = frac.clone().unwrap_or_default();
            prop_assume!(!int.is_empty() || !frac_digits.is_empty());
            let sign = if negative { "-" } else { "" };
            let point = frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default();
            let exp = exponent.map(|e| format!("e{e:+}")).unwrap_or_default();
            let text = format!("{sign}{int}{point}{exp}");
            let got = numeric_normalize(&text).unwrap();
            prop_assert_eq!(&got, &reference(negative, &int, &frac_digits, exponent.unwrap_or(0)));
            // Same value as a float, and normalising is idempotent (jsonb text is re-normalised).
            let (a, b): (f64, f64) = (got.parse().unwrap(), text.parse().unwrap());
            prop_assert!((a - b).abs() <= b.abs() * 1e-12, "{} vs {}", got, text);
            prop_assert_eq!(numeric_normalize(&got).unwrap(), got.clone());
            prop_assert_eq!(render(text.as_bytes(), &Category::Number).unwrap().to_string(), got);
        }
    }
}
