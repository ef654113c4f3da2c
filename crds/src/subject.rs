//! NATS subjects: syntax checks and the "is this filter inside these subjects" question the operator asks before
//! it creates a consumer.

/// Why a subject is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject {subject:?}: {reason}")]
pub struct SubjectError {
    /// The subject as given.
    pub subject: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks a subject or subject filter: non-empty dot-separated tokens, no whitespace, `*` only as a whole token,
/// `>` only as the whole last token.
pub fn validate(subject: &str) -> Result<(), SubjectError> {
    let err = |reason| SubjectError {
        subject: subject.to_string(),
        reason,
    };
    if subject.is_empty() {
        return Err(err("empty"));
    }
    if subject.chars().any(char::is_whitespace) {
        return Err(err("contains whitespace"));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(err("empty token (leading, trailing or double dot)"));
        }
        if token.contains('>') && (*token != ">" || i + 1 != tokens.len()) {
            return Err(err("`>` may only be the whole last token"));
        }
        if token.contains('*') && *token != "*" {
            return Err(err("`*` may only be a whole token"));
        }
    }
    Ok(())
}

/// Whether every subject matched by `filter` is also matched by `pattern`.
pub fn is_subset(filter: &str, pattern: &str) -> bool {
    let f: Vec<&str> = filter.split('.').collect();
    let p: Vec<&str> = pattern.split('.').collect();
    for (i, pt) in p.iter().enumerate() {
        if *pt == ">" {
            return f.len() > i;
        }
        let Some(ft) = f.get(i) else { return false };
        match (*pt, *ft) {
            ("*", ">") => return false,
            ("*", _) => {}
            (_, "*" | ">") => return false,
            (a, b) if a == b => {}
            _ => return false,
        }
    }
    f.len() == p.len()
}

/// Whether `filter` lies within at least one of `patterns`.
pub fn is_covered(filter: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| is_subset(filter, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_subjects_and_wildcards() {
        for s in [
            "a",
            "a.b.c",
            "a.*.c",
            "a.>",
            ">",
            "*",
            "default.users.user.42",
        ] {
            assert_eq!(validate(s), Ok(()), "{s}");
        }
    }

    #[test]
    fn rejects_malformed_subjects() {
        for s in ["", "a..b", ".a", "a.", "a.>.b", "a b", "a.b*", "a.>x"] {
            assert!(validate(s).is_err(), "{s}");
        }
    }

    #[test]
    fn subset_follows_wildcard_semantics() {
        assert!(is_subset("ns.users.user.>", "ns.users.>"));
        assert!(is_subset("ns.users.user.1", "ns.users.>"));
        assert!(is_subset("ns.users.*.1", "ns.users.>"));
        assert!(is_subset("ns.users.x", "ns.users.*"));
        assert!(!is_subset("ns.users", "ns.users.>"));
        assert!(!is_subset("ns.users.>", "ns.users.*"));
        assert!(!is_subset("ns.orders.>", "ns.users.>"));
        assert!(!is_subset("ns.*.x", "ns.users.x"));
        assert!(is_subset("a.b", "a.b"));
        assert!(!is_subset("a.b.c", "a.b"));
    }
}
