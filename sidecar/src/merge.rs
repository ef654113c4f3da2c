//! Merging consecutive events into one multi-row `INSERT` (Postgres fast path).
//!
//! A handler of exactly one statement of the shape `INSERT INTO t (c1, …) VALUES (…) [ON CONFLICT …]`, whose
//! parameters all sit in the `VALUES` tuple, can run for a run of consecutive events as one statement with one tuple
//! per event. That is equivalent to running it once per event, in order, as long as no two rows of one statement
//! touch the same row: for `ON CONFLICT (cols) DO UPDATE` a run is cut wherever a conflict key repeats (Postgres
//! would refuse the statement anyway), and `ON CONFLICT DO NOTHING` or a plain `INSERT` treat a repeated key the
//! same way merged or not. The analysis is deliberately conservative — any subquery, `RETURNING`, comment,
//! quoted identifier, dollar quote, several tuples, or parameter outside the tuple, and the statement is not
//! merged. One difference remains observable: statement-level triggers fire once per merged statement.
//!
//! MySQL/MariaDB statements (`?` placeholders) merge the same way: see [`analyze_for`].

use projectionist_crds::projection::Driver;

/// A statement that can take several rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mergeable {
    /// Everything up to and including `VALUES `.
    prefix: String,
    /// The tuple, with its placeholders numbered `$1..$params`.
    tuple: String,
    /// Everything after the tuple (`ON CONFLICT …`), without placeholders.
    suffix: String,
    /// Parameters per row.
    pub params: usize,
    /// For `DO UPDATE`: the (0-based) parameters whose values form the conflict key.
    pub key: Option<Vec<usize>>,
    /// Placeholders are `?` (MySQL): rendered without numbers, bound in order of appearance.
    positional: bool,
}

/// Rows per merged statement, at most (chunks are powers of two, so few statements get prepared).
pub const MAX_ROWS: usize = 128;

fn words_upper(s: &str) -> String {
    s.to_ascii_uppercase()
}

/// Finds `needle` (upper case) as a whole word in `haystack_upper` at depth 0 outside quotes.
fn find_top_level(text: &str, needle: &str) -> Option<usize> {
    let upper = words_upper(text);
    let bytes = text.as_bytes();
    let (mut depth, mut i, mut in_string) = (0i32, 0usize, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if c == b'\'' {
                if bytes.get(i + 1) == Some(&b'\'') {
                    i += 1;
                } else {
                    in_string = false;
                }
            }
        } else {
            match c {
                b'\'' => in_string = true,
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ if depth == 0 && upper[i..].starts_with(needle) => {
                    let before =
                        i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                    let end = i + needle.len();
                    let after = end >= bytes.len()
                        || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
                    if before && after {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// The index just past the parenthesis that closes the one at `open`.
fn matching_paren(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut i, mut in_string) = (0i32, open, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if c == b'\'' {
                if bytes.get(i + 1) == Some(&b'\'') {
                    i += 1;
                } else {
                    in_string = false;
                }
            }
        } else {
            match c {
                b'\'' => in_string = true,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Splits a parenthesised list's inside at top-level commas.
fn split_list(inside: &str) -> Vec<String> {
    let bytes = inside.as_bytes();
    let (mut depth, mut in_string, mut start) = (0i32, false, 0usize);
    let mut out = Vec::new();
    for (i, &c) in bytes.iter().enumerate() {
        if in_string {
            if c == b'\'' {
                in_string = false;
            }
            continue;
        }
        match c {
            b'\'' => in_string = true,
            b'(' => depth += 1,
            b')' => depth -= 1,
            b',' if depth == 0 => {
                out.push(inside[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(inside[start..].trim().to_string());
    out
}

/// Whether `text` (outside string literals) holds a `$<digits>` placeholder.
fn has_placeholder(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut in_string = false;
    for (i, &c) in bytes.iter().enumerate() {
        if c == b'\'' {
            in_string = !in_string;
        } else if !in_string && c == b'$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return true;
        }
    }
    false
}

/// The parameter a tuple element is, if it is a plain `$n` (optionally cast: `$n::type`).
fn plain_param(element: &str) -> Option<usize> {
    let rest = element.strip_prefix('$')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tail = &rest[digits.len()..];
    if !(tail.is_empty()
        || (tail.starts_with("::")
            && tail[2..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')))
    {
        return None;
    }
    digits
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .map(|n| n - 1)
}

/// Analyses a Postgres statement (placeholders already `$n`) with `params` parameters.
pub fn analyze(sql: &str, params: usize) -> Option<Mergeable> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    if ["--", "/*", "$$", ";", "\"", "E'", "e'"]
        .iter()
        .any(|t| sql.contains(t))
    {
        return None;
    }
    let upper = words_upper(sql);
    if !upper.starts_with("INSERT INTO ")
        || upper.contains("SELECT")
        || find_top_level(sql, "RETURNING").is_some()
    {
        return None;
    }
    let values_at = find_top_level(sql, "VALUES")?;
    let prefix_cols = &sql[..values_at];
    let open_cols = prefix_cols.find('(')?;
    let close_cols = matching_paren(prefix_cols, open_cols)?;
    let columns: Vec<String> = split_list(&prefix_cols[open_cols + 1..close_cols - 1])
        .into_iter()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let after_values = values_at + "VALUES".len();
    let open = after_values + sql[after_values..].find('(')?;
    if !sql[after_values..open].trim().is_empty() {
        return None;
    }
    let close = matching_paren(sql, open)?;
    let tuple = &sql[open..close];
    let suffix = &sql[close..];
    if suffix.trim_start().starts_with(',')
        || has_placeholder(suffix)
        || has_placeholder(&sql[..open])
    {
        return None;
    }
    let elements = split_list(&tuple[1..tuple.len() - 1]);
    if elements.len() != columns.len() {
        return None;
    }
    let suffix_upper = words_upper(suffix);
    let key = if suffix_upper.contains("DO UPDATE") {
        let on = find_top_level(suffix, "CONFLICT")?;
        let rest = &suffix[on + "CONFLICT".len()..];
        let open_key = rest.find('(')?;
        if !rest[..open_key].trim().is_empty() {
            return None;
        }
        let close_key = matching_paren(rest, open_key)?;
        let key_columns = split_list(&rest[open_key + 1..close_key - 1]);
        let mut key = Vec::new();
        for column in key_columns {
            let position = columns
                .iter()
                .position(|c| *c == column.to_ascii_lowercase())?;
            key.push(plain_param(&elements[position])?);
        }
        Some(key)
    } else {
        None
    };
    Some(Mergeable {
        prefix: format!("{} ", sql[..after_values].trim_end()),
        tuple: tuple.to_string(),
        suffix: suffix.to_string(),
        params,
        key,
        positional: false,
    })
}

/// Analyses a handler statement in its driver's placeholders. PostgreSQL: as [`analyze`]. MySQL/MariaDB: `?`
/// placeholders, and `INSERT … VALUES (…) ON DUPLICATE KEY UPDATE …` merges without cutting at repeated keys,
/// because MySQL applies a multi-row insert row by row (a later row's duplicate key updates the row an earlier one
/// inserted, exactly as separate statements would); a backslash anywhere (MySQL's string escapes) and it is not
/// merged. SQLite: never (it runs in-process; there is no round trip to save).
pub fn analyze_for(driver: Driver, sql: &str, params: usize) -> Option<Mergeable> {
    match driver {
        Driver::Postgres => analyze(sql, params),
        Driver::Mysql => {
            if sql.contains('\\') {
                return None;
            }
            let numbered = number_positional(sql, params)?;
            let mut merge = analyze(&numbered, params)?;
            merge.positional = true;
            Some(merge)
        }
        Driver::Sqlite => None,
    }
}

/// `?` placeholders outside string literals numbered `$1…$n`; `None` unless there are exactly `params`.
fn number_positional(sql: &str, params: usize) -> Option<String> {
    let mut out = String::with_capacity(sql.len() + params * 2);
    let (mut in_string, mut n) = (false, 0);
    for c in sql.chars() {
        match c {
            '\'' => {
                in_string = !in_string;
                out.push(c);
            }
            '?' if !in_string => {
                n += 1;
                out.push_str(&format!("${n}"));
            }
            '$' if !in_string => return None,
            _ => out.push(c),
        }
    }
    (n == params).then_some(out)
}

impl Mergeable {
    /// The statement for `rows` rows: row `r`'s placeholders are shifted by `r × params`.
    pub fn render(&self, rows: usize) -> String {
        let mut out = String::with_capacity(
            self.prefix.len() + rows * (self.tuple.len() + 8) + self.suffix.len(),
        );
        out.push_str(&self.prefix);
        for r in 0..rows {
            if r > 0 {
                out.push_str(", ");
            }
            let offset = r * self.params;
            let bytes = self.tuple.as_bytes();
            let mut i = 0;
            let mut in_string = false;
            while i < bytes.len() {
                let c = bytes[i];
                if c == b'\'' {
                    in_string = !in_string;
                }
                if !in_string && c == b'$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    let mut j = i + 1;
                    while j < bytes.len() && bytes[j].is_ascii_digit() {
                        j += 1;
                    }
                    let n: usize = self.tuple[i + 1..j].parse().unwrap_or(0);
                    if self.positional {
                        out.push('?');
                    } else {
                        out.push('$');
                        out.push_str(&(n + offset).to_string());
                    }
                    i = j;
                    continue;
                }
                out.push(c as char);
                i += 1;
            }
        }
        out.push_str(&self.suffix);
        out
    }
}

/// Splits a run length into power-of-two chunks of at most [`MAX_ROWS`], largest first.
pub fn chunks(mut len: usize) -> Vec<usize> {
    let mut out = Vec::new();
    while len > 0 {
        let mut size = MAX_ROWS;
        while size > len {
            size /= 2;
        }
        out.push(size);
        len -= size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSERT: &str = "INSERT INTO ledger (account, hash, events) VALUES ($1, $2, 1) ON CONFLICT (account) \
                          DO UPDATE SET hash = (ledger.hash * 31 + excluded.hash) % 1000000007, events = ledger.events + 1";

    #[test]
    fn an_upsert_with_a_plain_key_merges_and_renumbers() {
        let m = analyze(UPSERT, 2).expect("mergeable");
        assert_eq!(m.key, Some(vec![0]));
        let sql = m.render(3);
        assert!(
            sql.starts_with("INSERT INTO ledger (account, hash, events) VALUES ($1, $2, 1), ($3, $4, 1), ($5, $6, 1) ON CONFLICT"),
            "{sql}"
        );
    }

    #[test]
    fn inserts_without_update_merge_without_a_key() {
        let m = analyze(
            "INSERT INTO r (u, role, at) VALUES ($1, $2, $3) ON CONFLICT (u, role) DO NOTHING",
            3,
        )
        .expect("m");
        assert_eq!(m.key, None);
        let m = analyze("INSERT INTO users (id, name) VALUES ($1, lower($2))", 2).expect("m");
        assert_eq!(
            m.render(2),
            "INSERT INTO users (id, name) VALUES ($1, lower($2)), ($3, lower($4))"
        );
        let m = analyze("INSERT INTO t (a, b) VALUES ($1::text, 'it''s $9') ON CONFLICT (a) DO UPDATE SET b = excluded.b", 1)
            .expect("m");
        assert_eq!(m.key, Some(vec![0]));
        assert_eq!(
            m.render(2),
            "INSERT INTO t (a, b) VALUES ($1::text, 'it''s $9'), ($2::text, 'it''s $9') ON CONFLICT (a) DO UPDATE SET b = excluded.b"
        );
    }

    #[test]
    fn anything_unusual_is_not_merged() {
        for sql in [
            "UPDATE t SET a = $1",
            "INSERT INTO t (a) SELECT $1",
            "INSERT INTO t (a) VALUES ((SELECT max(a) FROM t))",
            "INSERT INTO t (a) VALUES ($1) RETURNING a",
            "INSERT INTO t (a) VALUES ($1), ($2)",
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET b = $2",
            "INSERT INTO t (a, b) VALUES (lower($1), $2) ON CONFLICT (a) DO UPDATE SET b = excluded.b",
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT ON CONSTRAINT t_pkey DO UPDATE SET b = excluded.b",
            "INSERT INTO \"T\" (a) VALUES ($1)",
            "INSERT INTO t (a) VALUES ($1) -- note",
            "INSERT INTO t VALUES ($1)",
        ] {
            assert_eq!(analyze(sql, 2), None, "{sql}");
        }
    }

    #[test]
    fn chunks_are_powers_of_two() {
        assert_eq!(chunks(300), vec![128, 128, 32, 8, 4]);
        assert_eq!(chunks(1), vec![1]);
        assert!(chunks(0).is_empty());
    }

    #[test]
    fn mysql_upserts_merge_with_positional_placeholders() {
        let sql = "INSERT INTO ledger (account, hash, events) VALUES (?, ?, 1) \
                   ON DUPLICATE KEY UPDATE hash = (hash * 31 + VALUES(hash)) % 1000000007, events = events + 1";
        let m = analyze_for(Driver::Mysql, sql, 2).expect("mergeable");
        assert_eq!(m.key, None, "MySQL applies rows in order: no cut needed");
        assert_eq!(
            m.render(3),
            "INSERT INTO ledger (account, hash, events) VALUES (?, ?, 1), (?, ?, 1), (?, ?, 1) \
             ON DUPLICATE KEY UPDATE hash = (hash * 31 + VALUES(hash)) % 1000000007, events = events + 1"
        );
    }

    #[test]
    fn mysql_statements_that_are_not_plain_inserts_do_not_merge() {
        for sql in [
            "INSERT INTO t (a) VALUES ('it\\'s ?')",
            "INSERT INTO t (a, b) VALUES (?, ?) ON DUPLICATE KEY UPDATE b = ?",
            "UPDATE t SET a = ? WHERE b = ?",
            "INSERT INTO t (a) SELECT ? FROM dual",
        ] {
            let params = sql.matches('?').count();
            assert!(analyze_for(Driver::Mysql, sql, params).is_none(), "{sql}");
        }
        assert!(analyze_for(Driver::Sqlite, "INSERT INTO t (a) VALUES (?)", 1).is_none());
    }

    #[test]
    fn a_question_mark_in_a_string_is_not_a_placeholder() {
        let m =
            analyze_for(Driver::Mysql, "INSERT INTO t (a, b) VALUES (?, '?')", 1).expect("merges");
        assert_eq!(
            m.render(2),
            "INSERT INTO t (a, b) VALUES (?, '?'), (?, '?')"
        );
    }
}
