//! Arrays: `array_out` text, and the brace-less int2vector/oidvector form, as nested JSON
//! arrays whose elements are rendered by their own kind.

use serde_json::Value;

use super::{Category, RenderError, is_pg_space, render_at, snippet, utf8};

/// Postgres's MAXDIM.
const MAX_ARRAY_DIMS: usize = 6;

pub(super) fn parse_array(
    text: &[u8],
    elem: &Category,
    delim: u8,
    depth: usize,
) -> Result<Value, RenderError> {
    let mut p = ArrayParser {
        s: text,
        pos: 0,
        delim,
        elem,
        depth,
        dims: [None; MAX_ARRAY_DIMS],
        leaf: None,
    };
    p.skip_ws();
    let bounds = match p.peek() {
        Some(b'[') => p.parse_bounds()?,
        Some(b'{') => Vec::new(),
        _ if text.iter().all(|&b| b.is_ascii_digit() || b == b'-' || is_pg_space(b)) => {
            return parse_vector(text, elem, depth);
        }
        _ => return Err(p.error()),
    };
    p.skip_ws();
    let value = p.parse_level(0)?;
    p.skip_ws();
    if p.pos != text.len() {
        return Err(p.error());
    }
    if !bounds.is_empty() {
        // array_in insists the decoration agrees with the braces.
        let ndims = p.leaf.map_or(0, |l| l + 1);
        let agrees = bounds.len() == ndims
            && bounds.iter().zip(&p.dims).all(|(&(lb, ub), &n)| {
                ub.checked_sub(lb).and_then(|d| d.checked_add(1)) == n.map(|n| n as i64)
            });
        if !agrees {
            return Err(p.error());
        }
    }
    Ok(value)
}

/// int2vector and oidvector print their elements separated by spaces, without braces, yet
/// `to_jsonb` treats them as arrays.
fn parse_vector(text: &[u8], elem: &Category, depth: usize) -> Result<Value, RenderError> {
    utf8(text)?
        .split_ascii_whitespace()
        .map(|item| render_at(item.as_bytes(), elem, depth))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

struct ArrayParser<'a> {
    s: &'a [u8],
    pos: usize,
    delim: u8,
    elem: &'a Category,
    depth: usize,
    /// Item count of every brace group seen at each level; they must all agree.
    dims: [Option<usize>; MAX_ARRAY_DIMS],
    /// The level whose brace groups hold elements rather than sub-arrays.
    leaf: Option<usize>,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek();
        self.pos += usize::from(b.is_some());
        b
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_pg_space) {
            self.pos += 1;
        }
    }

    fn error(&self) -> RenderError {
        RenderError::BadArray(snippet(self.s))
    }

    fn expect(&mut self, b: u8) -> Result<(), RenderError> {
        if self.bump() == Some(b) { Ok(()) } else { Err(self.error()) }
    }

    /// `[lb:ub][lb:ub]...=`, which array_out adds when a lower bound is not 1.
    fn parse_bounds(&mut self) -> Result<Vec<(i64, i64)>, RenderError> {
        let mut bounds = Vec::new();
        while self.peek() == Some(b'[') {
            if bounds.len() == MAX_ARRAY_DIMS {
                return Err(self.error());
            }
            self.pos += 1;
            let first = self.parse_int()?;
            let bound = if self.peek() == Some(b':') {
                self.pos += 1;
                (first, self.parse_int()?)
            } else {
                (1, first)
            };
            self.expect(b']')?;
            self.skip_ws();
            bounds.push(bound);
        }
        self.expect(b'=')?;
        Ok(bounds)
    }

    fn parse_int(&mut self) -> Result<i64, RenderError> {
        self.skip_ws();
        let negative = self.peek() == Some(b'-');
        if matches!(self.peek(), Some(b'-' | b'+')) {
            self.pos += 1;
        }
        let start = self.pos;
        let mut n: i64 = 0;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(i64::from(d - b'0')))
                .ok_or_else(|| self.error())?;
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error());
        }
        self.skip_ws();
        Ok(if negative { -n } else { n })
    }

    /// One brace group at `level`, starting at its `{`.
    fn parse_level(&mut self, level: usize) -> Result<Value, RenderError> {
        if level >= MAX_ARRAY_DIMS {
            return Err(RenderError::TooDeep(MAX_ARRAY_DIMS));
        }
        self.expect(b'{')?;
        self.skip_ws();
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                self.skip_ws();
                let item = if self.peek() == Some(b'{') {
                    if self.leaf.is_some_and(|l| l <= level) {
                        return Err(self.error());
                    }
                    self.parse_level(level + 1)?
                } else {
                    if self.leaf.is_some_and(|l| l != level) {
                        return Err(self.error());
                    }
                    self.leaf = Some(level);
                    self.parse_element()?
                };
                items.push(item);
                self.skip_ws();
                match self.bump() {
                    Some(b'}') => break,
                    Some(c) if c == self.delim => {}
                    _ => return Err(self.error()),
                }
            }
        }
        let seen = self.dims.get_mut(level).ok_or(RenderError::TooDeep(MAX_ARRAY_DIMS))?;
        match seen {
            Some(n) if *n != items.len() => return Err(self.error()),
            _ => *seen = Some(items.len()),
        }
        Ok(Value::Array(items))
    }

    /// One element, undoing array_out's quoting: double quotes group, backslash escapes one
    /// byte, unquoted trailing whitespace is dropped, and only an unquoted NULL is null.
    fn parse_element(&mut self) -> Result<Value, RenderError> {
        let mut buf = Vec::new();
        let mut quoted = false;
        // Bytes up to here came from quotes or escapes and survive whitespace trimming.
        let mut kept = 0;
        loop {
            match self.peek() {
                None | Some(b'{') => return Err(self.error()),
                Some(b'}') => break,
                Some(c) if c == self.delim => break,
                Some(b'"') => {
                    quoted = true;
                    self.pos += 1;
                    loop {
                        match self.bump() {
                            None => return Err(self.error()),
                            Some(b'"') => break,
                            Some(b'\\') => buf.push(self.bump().ok_or_else(|| self.error())?),
                            Some(c) => buf.push(c),
                        }
                    }
                    kept = buf.len();
                }
                Some(b'\\') => {
                    quoted = true;
                    self.pos += 1;
                    buf.push(self.bump().ok_or_else(|| self.error())?);
                    kept = buf.len();
                }
                Some(c) => {
                    buf.push(c);
                    self.pos += 1;
                }
            }
        }
        while buf.len() > kept && buf.last().copied().is_some_and(is_pg_space) {
            buf.pop();
        }
        if !quoted {
            if buf.is_empty() {
                return Err(self.error());
            }
            if buf.eq_ignore_ascii_case(b"NULL") {
                return Ok(Value::Null);
            }
        }
        render_at(&buf, self.elem, self.depth)
    }
}

#[cfg(test)]
mod tests {
    //! The pairs below were observed on PostgreSQL 15, as described in `render::tests`.
    #![allow(clippy::unwrap_used)]

    use crate::capture::render::Category;
    use crate::capture::render::tests::{array, check, check_fails, check_lines};

    #[test]
    fn arrays() {
        let ints = array(Category::Number);
        check_lines(
            &ints,
            r#"{1,2,NULL} => [1, 2, null]
            {{1,2},{3,NULL}} => [[1, 2], [3, null]]
            {} => []
            [0:1]={1,2} => [1, 2]
            [0:1][2:3]={{1,2},{3,4}} => [[1, 2], [3, 4]]
            [-1:0][1:2]={{1,NULL},{-1,0}} => [[1, null], [-1, 0]]
            {{{{{{1}}}}}} => [[[[[[1]]]]]]
            {1.50,NaN} => [1.50, "NaN"]
            [2:3]={NaN,1.5e-07} => ["NaN", 0.00000015]
            1 -1 0 => [1, -1, 0]"#,
        );
        // int2vector prints like "1 2"; an empty one prints nothing; int2vector[] nests them.
        check(&ints, "", "[]");
        check(&ints, " { 1 , 2 } ", "[1, 2]");
        check(&array(array(Category::Number)), r#"{"1 2",3}"#, "[[1, 2], [3]]");
        check(
            &ints,
            "{NaN,Infinity,1e+100,-0}",
            &format!(r#"["NaN", "Infinity", 1{}, 0]"#, "0".repeat(100)),
        );
        check_lines(
            &array(Category::Text),
            r#"{"a b","c\"d","NULL",NULL,"","x\\y","{}"," lead",NULL,"NuLl",nUlL} => ["a b", "c\"d", "NULL", null, "", "x\\y", "{}", " lead", null, "NuLl", null]
            {{"a b",NULL},{"c\"d",""}} => [["a b", null], ["c\"d", ""]]
            {a b  ,"x "  ,\ } => ["a b", "x ", " "]
            {"\\x00ff"} => ["\\x00ff"]
            {happy,NULL,"so sad"} => ["happy", null, "so sad"]
            {"ab ",NULL} => ["ab ", null]"#,
        );
        check_lines(&array(Category::Bool), "{t,f,NULL} => [true, false, null]");
        check_lines(
            &array(Category::TimestampTz),
            r#"{"2024-01-02 03:04:05+00",infinity} => ["2024-01-02T03:04:05+00:00", "infinity"]
            {-infinity,"1999-01-08 04:05:06.123456+00 BC"} => ["-infinity", "1999-01-08T04:05:06.123456+00:00 BC"]"#,
        );
        check_lines(
            &array(Category::Timestamp),
            r#"{"12345-01-01 00:00:00"} => ["12345-01-01T00:00:00"]"#,
        );
        check_lines(
            &array(Category::Date),
            r#"{2024-01-02,infinity,"0044-03-15 BC"} => ["2024-01-02", "infinity", "0044-03-15 BC"]"#,
        );
        check_lines(
            &array(Category::Json),
            r#"{"{\"b\":1.0,\"a\":2}",NULL} => [{"a": 2, "b": 1.0}, null]"#,
        );
        check_lines(
            &array(Category::Jsonb),
            r#"{"{\"a\": 2, \"b\": 1.0}",NULL} => [{"a": 2, "b": 1.0}, null]"#,
        );
        let boxes = Category::Array { elem: Box::new(Category::Text), delim: b';' };
        check_lines(&boxes, r#"{(1,1),(0,0);(3,3),(2,2)} => ["(1,1),(0,0)", "(3,3),(2,2)"]"#);
        check_fails(
            &ints,
            r#"{1,2
            {1,,2}
            {{1},2}
            {1,{2}}
            {{1,2},{3}}
            {{{{{{{1}}}}}}}
            {1}x
            {x}
            [1:3]={1,2}
            [1:2]={{1},{2}}
            [1:2={1,2}
            [1:2]{1,2}
            {"1}
            {1\
            abc
            {1{2}}"#,
        );
    }
}
