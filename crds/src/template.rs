//! SQL handler templates: named parameters in, driver placeholders out.
//!
//! A handler statement names the values it needs as `:data.<path>` (a field of the event's JSON data; `:data` alone
//! is the whole document) or `:event.<field>` (`id`, `type`, `source`, `subject`, `time`, `sequence`). [`parse`]
//! rewrites them into the driver's positional placeholders — `$1`, `$2`, … for Postgres (a parameter used twice gets
//! one number), `?` for MySQL and SQLite — and returns the value paths in binding order. Values are always bound,
//! never spliced into the SQL.
//!
//! The scanner knows enough SQL to leave alone what is not a parameter: string literals (`'…'`, `E'…'`, MySQL's
//! `"…"`), quoted identifiers (`"…"`, `` `…` ``, SQLite's `[…]`), Postgres dollar-quoted bodies (`$tag$…$tag$`),
//! comments (`-- …`, `/* … */`, MySQL's `# …`) and Postgres `::` casts. Positional placeholders written by hand
//! (`$1`, `?`) are refused, since the parameter list is the template's to build.

use std::fmt;

use crate::projection::{Driver, Handler};

/// A field of the event's envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventField {
    /// `ce-id`.
    Id,
    /// `ce-type`.
    Type,
    /// `ce-source`.
    Source,
    /// `ce-subject`, or the NATS subject when the event has none.
    Subject,
    /// `ce-time` (RFC 3339 text).
    Time,
    /// The stream sequence of the event.
    Sequence,
}

impl EventField {
    /// All fields, with their names in templates.
    pub const ALL: [(&'static str, EventField); 6] = [
        ("id", EventField::Id),
        ("type", EventField::Type),
        ("source", EventField::Source),
        ("subject", EventField::Subject),
        ("time", EventField::Time),
        ("sequence", EventField::Sequence),
    ];

    /// The field's name in templates.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

/// Where a parameter's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ParamPath {
    /// A field of the envelope.
    Event(EventField),
    /// A path into the JSON data; empty means the whole document. A segment of digits indexes an array.
    Data(Vec<String>),
}

impl fmt::Display for ParamPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamPath::Event(field) => write!(f, ":event.{}", field.name()),
            ParamPath::Data(path) if path.is_empty() => write!(f, ":data"),
            ParamPath::Data(path) => write!(f, ":data.{}", path.join(".")),
        }
    }
}

/// A parsed statement: SQL with positional placeholders and the values to bind, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The SQL to send.
    pub sql: String,
    /// One entry per placeholder (Postgres: per distinct `$n`), in binding order.
    pub params: Vec<ParamPath>,
}

/// A template that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at line {line}, column {column} of statement {statement:?}")]
pub struct TemplateError {
    /// The statement as written.
    pub statement: String,
    /// Byte offset of the problem.
    pub offset: usize,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// A handler statement that does not parse, with the handler and statement it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("handler for {event:?}, statement {index}: {source}")]
pub struct HandlerError {
    /// The handler's event type.
    pub event: String,
    /// 1-based index of the statement within the handler.
    pub index: usize,
    /// The parse error.
    #[source]
    pub source: TemplateError,
}

/// Parses every statement of every handler, stopping at the first bad one.
pub fn parse_handlers(
    handlers: &[Handler],
    driver: Driver,
) -> Result<Vec<(String, Vec<Statement>)>, HandlerError> {
    handlers
        .iter()
        .map(|h| {
            let statements = h
                .sql
                .iter()
                .enumerate()
                .map(|(i, sql)| {
                    parse(sql, driver).map_err(|source| HandlerError {
                        event: h.event.clone(),
                        index: i + 1,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((h.event.clone(), statements))
        })
        .collect()
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

struct Scanner<'a> {
    src: &'a str,
    chars: Vec<(usize, char)>,
    i: usize,
    driver: Driver,
    out: String,
    params: Vec<ParamPath>,
}

impl<'a> Scanner<'a> {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.i + ahead).map(|(_, c)| *c)
    }

    fn offset(&self, i: usize) -> usize {
        self.chars.get(i).map(|(o, _)| *o).unwrap_or(self.src.len())
    }

    fn error(&self, at: usize, message: impl Into<String>) -> TemplateError {
        let offset = self.offset(at);
        let before = &self.src[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .map(|l| l.chars().count())
            .unwrap_or(0)
            + 1;
        TemplateError {
            statement: self.src.to_string(),
            offset,
            line,
            column,
            message: message.into(),
        }
    }

    /// Copies characters from the current position through the end of a quoted run.
    fn copy_quoted(
        &mut self,
        close: char,
        doubled_escapes: bool,
        backslash_escapes: bool,
        what: &str,
    ) -> Result<(), TemplateError> {
        let start = self.i;
        self.push_next();
        loop {
            let Some(c) = self.peek(0) else {
                return Err(self.error(start, format!("unterminated {what}")));
            };
            if backslash_escapes && c == '\\' {
                self.push_next();
                if self.peek(0).is_some() {
                    self.push_next();
                }
                continue;
            }
            self.push_next();
            if c == close {
                if doubled_escapes && self.peek(0) == Some(close) {
                    self.push_next();
                    continue;
                }
                return Ok(());
            }
        }
    }

    fn push_next(&mut self) {
        if let Some(c) = self.peek(0) {
            self.out.push(c);
            self.i += 1;
        }
    }

    fn copy_line_comment(&mut self) {
        while let Some(c) = self.peek(0) {
            self.push_next();
            if c == '\n' {
                break;
            }
        }
    }

    fn copy_block_comment(&mut self) -> Result<(), TemplateError> {
        let start = self.i;
        let nests = self.driver == Driver::Postgres;
        let mut depth = 0usize;
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some('/'), Some('*')) if depth == 0 || nests => {
                    depth += 1;
                    self.push_next();
                    self.push_next();
                }
                (Some('*'), Some('/')) => {
                    depth -= 1;
                    self.push_next();
                    self.push_next();
                    if depth == 0 {
                        return Ok(());
                    }
                }
                (Some(_), _) => self.push_next(),
                (None, _) => return Err(self.error(start, "unterminated block comment")),
            }
        }
    }

    /// `$` in Postgres: a dollar-quoted body, a hand-written `$1`, or part of an identifier.
    fn dollar(&mut self) -> Result<(), TemplateError> {
        let start = self.i;
        if self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            return Err(self.error(
                start,
                "positional placeholder not allowed; use a named parameter such as :data.id",
            ));
        }
        let mut j = self.i + 1;
        while self.chars.get(j).is_some_and(|(_, c)| is_ident_char(*c)) {
            j += 1;
        }
        if self.chars.get(j).map(|(_, c)| *c) != Some('$') {
            self.push_next();
            return Ok(());
        }
        let tag: String = self.chars[self.i..=j].iter().map(|(_, c)| c).collect();
        for _ in self.i..=j {
            self.push_next();
        }
        let tag_chars: Vec<char> = tag.chars().collect();
        loop {
            if self.peek(0).is_none() {
                return Err(self.error(start, format!("unterminated dollar-quoted string {tag}")));
            }
            let matches = tag_chars
                .iter()
                .enumerate()
                .all(|(k, tc)| self.peek(k) == Some(*tc));
            if matches {
                for _ in 0..tag_chars.len() {
                    self.push_next();
                }
                return Ok(());
            }
            self.push_next();
        }
    }

    fn parameter(&mut self) -> Result<(), TemplateError> {
        let start = self.i;
        self.i += 1; // the ':'
        let mut segments: Vec<String> = Vec::new();
        let mut current = String::new();
        while let Some(c) = self.peek(0) {
            if is_ident_char(c) {
                current.push(c);
                self.i += 1;
            } else if c == '.' && !current.is_empty() && self.peek(1).is_some_and(is_ident_char) {
                segments.push(std::mem::take(&mut current));
                self.i += 1;
            } else {
                break;
            }
        }
        segments.push(current);
        let root = segments.remove(0);
        let path = match root.as_str() {
            "data" => ParamPath::Data(segments),
            "event" => {
                let [field] = segments.as_slice() else {
                    return Err(self.error(
                        start,
                        "`:event` needs exactly one field: :event.id, :event.type, :event.source, :event.subject, :event.time or :event.sequence",
                    ));
                };
                let Some((_, f)) = EventField::ALL.iter().find(|(n, _)| n == field) else {
                    return Err(self.error(
                        start,
                        format!("unknown event field `{field}`: use id, type, source, subject, time or sequence"),
                    ));
                };
                ParamPath::Event(*f)
            }
            other => {
                return Err(self.error(
                    start,
                    format!("unknown parameter `:{other}`: parameters start with :data or :event"),
                ));
            }
        };
        match self.driver {
            Driver::Postgres => {
                let n = match self.params.iter().position(|p| *p == path) {
                    Some(existing) => existing + 1,
                    None => {
                        self.params.push(path);
                        self.params.len()
                    }
                };
                self.out.push_str(&format!("${n}"));
            }
            Driver::Mysql | Driver::Sqlite => {
                self.params.push(path);
                self.out.push('?');
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<Statement, TemplateError> {
        let pg = self.driver == Driver::Postgres;
        let mysql = self.driver == Driver::Mysql;
        let sqlite = self.driver == Driver::Sqlite;
        while let Some(c) = self.peek(0) {
            let prev = if self.i > 0 {
                Some(self.chars[self.i - 1].1)
            } else {
                None
            };
            match c {
                '\'' => {
                    let backslashes = mysql || (pg && matches!(prev, Some('E' | 'e')));
                    self.copy_quoted('\'', true, backslashes, "string literal")?;
                }
                '"' => self.copy_quoted(
                    '"',
                    true,
                    mysql,
                    if mysql {
                        "string literal"
                    } else {
                        "quoted identifier"
                    },
                )?,
                '`' if mysql || sqlite => {
                    self.copy_quoted('`', true, false, "quoted identifier")?
                }
                '[' if sqlite => self.copy_quoted(']', false, false, "quoted identifier")?,
                '-' if self.peek(1) == Some('-') => self.copy_line_comment(),
                '#' if mysql => self.copy_line_comment(),
                '/' if self.peek(1) == Some('*') => self.copy_block_comment()?,
                '$' if pg && !prev.is_some_and(is_ident_char) => self.dollar()?,
                '$' | '@' if sqlite && self.peek(1).is_some_and(is_ident_char) => {
                    return Err(self.error(self.i, "SQLite parameter syntax not allowed; use a named parameter such as :data.id"));
                }
                '?' if mysql || sqlite => {
                    return Err(self.error(self.i, "positional placeholder `?` not allowed; use a named parameter such as :data.id"));
                }
                ':' if self.peek(1) == Some(':') => {
                    self.push_next();
                    self.push_next();
                }
                ':' if self.peek(1).is_some_and(is_ident_start) => self.parameter()?,
                _ => self.push_next(),
            }
        }
        Ok(Statement {
            sql: self.out,
            params: self.params,
        })
    }
}

/// Parses one statement for `driver`.
pub fn parse(template: &str, driver: Driver) -> Result<Statement, TemplateError> {
    let scanner = Scanner {
        src: template,
        chars: template.char_indices().collect(),
        i: 0,
        driver,
        out: String::with_capacity(template.len()),
        params: Vec::new(),
    };
    if template.trim().is_empty() {
        return Err(scanner.error(0, "empty statement"));
    }
    scanner.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(path: &[&str]) -> ParamPath {
        ParamPath::Data(path.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn postgres_gets_numbered_placeholders_and_reuses_them() {
        let s = parse(
            "INSERT INTO users (id, email, seq) VALUES (:data.user.id, :data.email, :event.sequence) \
             ON CONFLICT (id) DO UPDATE SET email = :data.email",
            Driver::Postgres,
        )
        .expect("parses");
        assert_eq!(
            s.sql,
            "INSERT INTO users (id, email, seq) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET email = $2"
        );
        assert_eq!(
            s.params,
            vec![
                data(&["user", "id"]),
                data(&["email"]),
                ParamPath::Event(EventField::Sequence)
            ]
        );
    }

    #[test]
    fn mysql_and_sqlite_get_question_marks_in_order() {
        for driver in [Driver::Mysql, Driver::Sqlite] {
            let s = parse(
                "UPDATE t SET a = :data.a, b = :data.a WHERE id = :event.id",
                driver,
            )
            .expect("parses");
            assert_eq!(s.sql, "UPDATE t SET a = ?, b = ? WHERE id = ?");
            assert_eq!(
                s.params,
                vec![data(&["a"]), data(&["a"]), ParamPath::Event(EventField::Id)]
            );
        }
    }

    #[test]
    fn casts_strings_identifiers_and_comments_are_left_alone() {
        let sql = "SELECT ':data.x', \":data.y\", 'it''s :data.z' -- :data.c\n, :data.n::int /* :data.q */ FROM t";
        let s = parse(sql, Driver::Postgres).expect("parses");
        assert_eq!(
            s.sql,
            "SELECT ':data.x', \":data.y\", 'it''s :data.z' -- :data.c\n, $1::int /* :data.q */ FROM t"
        );
        assert_eq!(s.params, vec![data(&["n"])]);
    }

    #[test]
    fn postgres_dollar_quotes_and_escape_strings_are_skipped() {
        let s = parse(
            "SELECT $fn$ :data.x $fn$, E'\\' :data.y', :data.z",
            Driver::Postgres,
        )
        .expect("parses");
        assert_eq!(s.sql, "SELECT $fn$ :data.x $fn$, E'\\' :data.y', $1");
        assert_eq!(s.params, vec![data(&["z"])]);
    }

    #[test]
    fn mysql_backslash_strings_backticks_and_hash_comments_are_skipped() {
        let s = parse(
            "SELECT 'a\\' :data.x', `:data.y`, \":data.w\" # :data.c\n, :data.z",
            Driver::Mysql,
        )
        .expect("parses");
        assert_eq!(
            s.sql,
            "SELECT 'a\\' :data.x', `:data.y`, \":data.w\" # :data.c\n, ?"
        );
        assert_eq!(s.params, vec![data(&["z"])]);
    }

    #[test]
    fn sqlite_brackets_are_identifiers() {
        let s = parse("SELECT [:data.x] FROM t WHERE a = :data", Driver::Sqlite).expect("parses");
        assert_eq!(s.sql, "SELECT [:data.x] FROM t WHERE a = ?");
        assert_eq!(s.params, vec![ParamPath::Data(vec![])]);
    }

    #[test]
    fn array_indexes_and_assignment_are_understood() {
        let s = parse("SELECT :data.items.0.sku, @v := 1", Driver::Mysql).expect("parses");
        assert_eq!(s.sql, "SELECT ?, @v := 1");
        assert_eq!(s.params, vec![data(&["items", "0", "sku"])]);
    }

    #[test]
    fn errors_name_the_position_and_the_statement() {
        let e = parse(
            "INSERT INTO t VALUES (:data.id,\n  :user.id)",
            Driver::Postgres,
        )
        .expect_err("bad root");
        assert_eq!((e.line, e.column), (2, 3));
        assert!(e.message.contains(":user"), "{e}");
        assert!(e.to_string().contains("INSERT INTO t"), "{e}");

        let e = parse("SELECT :event.colour", Driver::Sqlite).expect_err("bad field");
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.column, 8);

        let e = parse("SELECT 'open", Driver::Postgres).expect_err("unterminated");
        assert!(e.message.contains("unterminated string"), "{e}");
        assert_eq!(e.column, 8);

        let e = parse("SELECT /* never closed", Driver::Mysql).expect_err("unterminated comment");
        assert!(e.message.contains("block comment"), "{e}");

        assert!(parse("SELECT $1", Driver::Postgres).is_err());
        assert!(parse("SELECT ?", Driver::Mysql).is_err());
        assert!(parse("SELECT $name", Driver::Sqlite).is_err());
        assert!(parse("  ", Driver::Sqlite).is_err());
        assert!(parse("SELECT :event", Driver::Postgres).is_err());
    }

    #[test]
    fn postgres_operators_that_look_like_placeholders_stay() {
        let s = parse(
            "SELECT doc ? 'k', a$b FROM t WHERE x = :data.x",
            Driver::Postgres,
        )
        .expect("parses");
        assert_eq!(s.sql, "SELECT doc ? 'k', a$b FROM t WHERE x = $1");
    }

    #[test]
    fn unicode_positions_count_characters() {
        let e = parse("SELECT 'ünï', :bad", Driver::Postgres).expect_err("bad");
        assert_eq!(e.column, 15);
    }

    #[test]
    fn handler_errors_name_the_handler_and_statement() {
        let handlers = vec![Handler {
            event: "UserCreated".into(),
            sql: vec!["SELECT 1".into(), "SELECT :nope".into()],
        }];
        let e = parse_handlers(&handlers, Driver::Postgres).expect_err("bad");
        assert_eq!((e.event.as_str(), e.index), ("UserCreated", 2));
        assert!(
            e.to_string()
                .starts_with("handler for \"UserCreated\", statement 2:"),
            "{e}"
        );
    }
}
