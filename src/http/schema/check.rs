//! The known values of a column from a `CHECK` constraint on it alone, read from
//! `pg_get_constraintdef` text. Only two shapes are understood, the ones Postgres prints for
//! `CHECK (col IN ('a', 'b'))` and `CHECK (col = 'a')`:
//!
//! ```text
//! CHECK ((status = ANY (ARRAY['a'::text, 'b'::text])))
//! CHECK (((vc)::text = ANY ((ARRAY['p'::character varying, 'q'::character varying])::text[])))
//! CHECK ((n = ANY (ARRAY[1.5, (2)::numeric])))
//! CHECK ((one = 'x'::text)) NOT VALID
//! ```
//!
//! Anything else (ranges, `OR` chains, functions of the column, `E''` strings, `NULL` in the
//! list) gives `None`: "no known values" is always a safe answer, a wrong list is not. Pure, and
//! it never panics on any text.

/// The literal texts of the list `definition` allows `column` to take, in the order written.
pub fn in_list(definition: &str, column: &str) -> Option<Vec<String>> {
    let tokens = tokenize(definition)?;
    let mut at = Cursor { tokens: &tokens, at: 0 };
    at.word("CHECK")?;
    // Parentheses opened before the column; the ones closed after it count down.
    let mut open = 0usize;
    while at.eat(&Token::Open) {
        open += 1;
    }
    match at.next()? {
        Token::Word(name) | Token::Quoted(name) if name == column => {}
        _ => return None,
    }
    loop {
        match at.peek()? {
            Token::Close if open > 0 => {
                open -= 1;
                at.at += 1;
            }
            Token::Cast => {
                at.at += 1;
                at.skip_type()?;
            }
            Token::Operator(op) if op == "=" => {
                at.at += 1;
                break;
            }
            _ => return None,
        }
    }
    let values = if at.peek() == Some(&Token::Word("ANY".into())) {
        at.at += 1;
        if !at.eat(&Token::Open) {
            return None;
        }
        let values = at.array()?;
        if !at.eat(&Token::Close) {
            return None;
        }
        values
    } else {
        vec![at.literal()?]
    };
    for _ in 0..open {
        if !at.eat(&Token::Close) {
            return None;
        }
    }
    if at.peek() == Some(&Token::Word("NOT".into())) {
        at.at += 1;
        at.word("VALID")?;
    }
    at.peek().is_none().then_some(values)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Comma,
    /// `::`
    Cast,
    Operator(String),
    /// An unquoted identifier or keyword, as written.
    Word(String),
    /// A `"quoted"` identifier, unescaped.
    Quoted(String),
    /// A `'string'` literal, unescaped.
    Text(String),
    Number(String),
}

/// Bounds the work on a pathological definition; real ones are far shorter.
const MAX_TOKENS: usize = 10_000;

fn tokenize(text: &str) -> Option<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if tokens.len() > MAX_TOKENS {
            return None;
        }
        let token = match c {
            c if c.is_whitespace() => continue,
            '(' => Token::Open,
            ')' => Token::Close,
            '[' => Token::OpenBracket,
            ']' => Token::CloseBracket,
            ',' => Token::Comma,
            ':' if chars.peek() == Some(&':') => {
                chars.next();
                Token::Cast
            }
            '\'' | '"' => {
                let mut content = String::new();
                loop {
                    match chars.next()? {
                        q if q == c && chars.peek() == Some(&c) => {
                            chars.next();
                            content.push(c);
                        }
                        q if q == c => break,
                        other => content.push(other),
                    }
                }
                if c == '\'' { Token::Text(content) } else { Token::Quoted(content) }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.peek().is_some_and(char::is_ascii_digit)) =>
            {
                let mut number = String::from(c);
                while let Some(&next) = chars.peek() {
                    let exponent_sign =
                        (next == '+' || next == '-') && number.ends_with(['e', 'E']);
                    if next.is_ascii_alphanumeric() || next == '.' || exponent_sign {
                        number.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                Token::Number(number)
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if next.is_alphanumeric() || next == '_' || next == '$' {
                        word.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                Token::Word(word)
            }
            c if "+-*/<>=~!@#%^&|`?".contains(c) => {
                let mut op = String::from(c);
                while let Some(&next) = chars.peek() {
                    if "+-*/<>=~!@#%^&|`?".contains(next) {
                        op.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                Token::Operator(op)
            }
            _ => return None,
        };
        tokens.push(token);
    }
    Some(tokens)
}

struct Cursor<'a> {
    tokens: &'a [Token],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<&Token> {
        let token = self.tokens.get(self.at)?;
        self.at += 1;
        Some(token)
    }

    fn eat(&mut self, token: &Token) -> bool {
        let found = self.peek() == Some(token);
        if found {
            self.at += 1;
        }
        found
    }

    fn word(&mut self, word: &str) -> Option<()> {
        matches!(self.next()?, Token::Word(w) if w == word).then_some(())
    }

    /// A type name after `::`: words (`double precision`), an optional `(n[, m])` modifier and
    /// any `[]` suffixes.
    fn skip_type(&mut self) -> Option<()> {
        let mut words = 0;
        while let Some(Token::Word(_) | Token::Quoted(_)) = self.peek() {
            self.at += 1;
            words += 1;
        }
        if words == 0 {
            return None;
        }
        // `numeric(10, 2)`: an opening parenthesis right after a type name is its modifier.
        if self.peek() == Some(&Token::Open)
            && matches!(self.tokens.get(self.at + 1), Some(Token::Number(_)))
        {
            self.at += 1;
            loop {
                match self.next()? {
                    Token::Number(_) | Token::Comma => {}
                    Token::Close => break,
                    _ => return None,
                }
            }
        }
        while self.eat(&Token::OpenBracket) {
            if !self.eat(&Token::CloseBracket) {
                return None;
            }
        }
        Some(())
    }

    /// One constant, possibly parenthesized and cast: `'a'::text`, `(2)::numeric`, `1.5`,
    /// `'-2'::integer`. Its text as written.
    fn literal(&mut self) -> Option<String> {
        let mut open = 0usize;
        while self.eat(&Token::Open) {
            open += 1;
        }
        let value = match self.next()? {
            Token::Text(text) | Token::Number(text) => text.clone(),
            Token::Operator(minus) if minus == "-" => match self.next()? {
                Token::Number(number) => format!("-{number}"),
                _ => return None,
            },
            _ => return None,
        };
        self.casts_and_closes(&mut open)?;
        (open == 0).then_some(value)
    }

    /// `ARRAY[...]`, possibly parenthesized and cast, as its elements.
    fn array(&mut self) -> Option<Vec<String>> {
        let mut open = 0usize;
        while self.eat(&Token::Open) {
            open += 1;
        }
        self.word("ARRAY")?;
        if !self.eat(&Token::OpenBracket) {
            return None;
        }
        let mut values = vec![self.literal()?];
        loop {
            match self.next()? {
                Token::Comma => values.push(self.literal()?),
                Token::CloseBracket => break,
                _ => return None,
            }
        }
        self.casts_and_closes(&mut open)?;
        (open == 0).then_some(values)
    }

    /// Casts, and closing parentheses while some opened before the value are still open.
    fn casts_and_closes(&mut self, open: &mut usize) -> Option<()> {
        loop {
            match self.peek() {
                Some(Token::Cast) => {
                    self.at += 1;
                    self.skip_type()?;
                }
                Some(Token::Close) if *open > 0 => {
                    *open -= 1;
                    self.at += 1;
                }
                _ => return Some(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::in_list;

    fn list(values: &[&str]) -> Option<Vec<String>> {
        Some(values.iter().map(|v| (*v).to_owned()).collect())
    }

    #[test]
    fn the_shapes_postgres_prints() {
        let cases = [
            ("CHECK ((status = ANY (ARRAY['a'::text, 'b'::text])))", "status", list(&["a", "b"])),
            ("CHECK ((one = 'x'::text))", "one", list(&["x"])),
            (
                "CHECK (((vc)::text = ANY ((ARRAY['p'::character varying, 'q'::character varying])::text[])))",
                "vc",
                list(&["p", "q"]),
            ),
            ("CHECK ((i4 = ANY (ARRAY[1, '-2'::integer, 3])))", "i4", list(&["1", "-2", "3"])),
            ("CHECK ((n = ANY (ARRAY[1.5, (2)::numeric])))", "n", list(&["1.5", "2"])),
            (
                "CHECK ((f = ANY (ARRAY[(1.5)::double precision, (2)::double precision])))",
                "f",
                list(&["1.5", "2"]),
            ),
            ("CHECK ((m = ANY (ARRAY['sad'::mood, 'ok'::mood])))", "m", list(&["sad", "ok"])),
            (
                r#"CHECK (("Odd Col" = ANY (ARRAY['it''s'::text, 'b"c'::text])))"#,
                "Odd Col",
                list(&["it's", "b\"c"]),
            ),
            ("CHECK ((x = ANY (ARRAY[1e+10, 2.5E-3])))", "x", list(&["1e+10", "2.5E-3"])),
            ("CHECK ((kind = 'a'::text)) NOT VALID", "kind", list(&["a"])),
            ("CHECK ((d = ANY (ARRAY[(1)::numeric(10,2)])))", "d", list(&["1"])),
            ("CHECK ((s = ANY (ARRAY['a'::\"My Type\"])))", "s", list(&["a"])),
        ];
        for (definition, column, expected) in cases {
            assert_eq!(in_list(definition, column), expected, "{definition}");
        }
    }

    #[test]
    fn other_shapes_and_garbage_give_nothing() {
        let cases = [
            ("CHECK ((status = ANY (ARRAY['a'::text, 'b'::text])))", "other"),
            ("CHECK ((n > 0))", "n"),
            ("CHECK (((n >= 0) AND (n <= 10)))", "n"),
            ("CHECK (((kind = 'a'::text) OR (kind = 'b'::text)))", "kind"),
            ("CHECK ((lower(s) = 'a'::text))", "s"),
            ("CHECK ((lower(s) = 'a'::text))", "lower"),
            ("CHECK ((s = ANY (ARRAY['a'::text, NULL::text])))", "s"),
            ("CHECK ((s = E'a\\\\b'::text))", "s"),
            ("CHECK (((s || 'x'::text) = 'ax'::text))", "s"),
            ("CHECK ((s = ANY (ARRAY['a'::text, 'b'::text]))", "s"),
            ("CHECK ((s = ANY (ARRAY['a'::text, 'b'::text])))) extra", "s"),
            ("CHECK ((s = ANY (ARRAY['unterminated)))", "s"),
            ("CHECK ((s = ANY (ARRAY[])))", "s"),
            ("CHECK ((s = ANY (ARRAY['a',])))", "s"),
            ("CHECK ((s = t))", "s"),
            ("CHECK ((s = ANY (ARRAY[[1, 2]])))", "s"),
            ("PRIMARY KEY (id)", "id"),
            ("", "s"),
            ("CHECK", "s"),
            ("CHECK (", "s"),
            ("CHECK ((s = 'a'::))", "s"),
            ("CHECK ((s = 'a'::text[)))", "s"),
            ("CHECK ((s = 'a'::text)) NOT", "s"),
            ("CHECK ((s = 'a'::text)) NOT ENFORCED", "s"),
            ("\u{0}\u{ffff}'\"::::[[[]]]", "s"),
            ("CHECK ((s = ANY (ARRAY['é'::text, '日本'::text]))) ;", "s"),
        ];
        for (definition, column) in cases {
            assert_eq!(in_list(definition, column), None, "{definition}");
        }
    }

    #[test]
    fn deep_or_long_input_does_not_panic() {
        let deep = format!("CHECK {}s = 'a'{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(in_list(&deep, "s"), None);
        let long = format!("CHECK ((s = ANY (ARRAY[{}'a'])))", "'x', ".repeat(20_000));
        assert_eq!(in_list(&long, "s"), None);
        let unicode = "CHECK ((s = ANY (ARRAY['é'::text, '日本'::text])))";
        assert_eq!(in_list(unicode, "s"), list(&["é", "日本"]));
    }
}
