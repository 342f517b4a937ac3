//! Name rules shared by the controller (which refuses bad manifests) and the
//! agent (which uses names in paths and container ids, so it checks again).

use core::fmt;

/// Why a name, label key or label value is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// The string is empty.
    Empty,
    /// The string is longer than the rule allows.
    TooLong { max: usize },
    /// A character outside the allowed set.
    BadChar { ch: char, index: usize },
    /// Must start and end with a lowercase letter or a digit.
    BadEdge,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("must not be empty"),
            Self::TooLong { max } => write!(f, "must be at most {max} characters"),
            Self::BadChar { ch, index } => {
                write!(f, "character {ch:?} at position {index} is not allowed")
            }
            Self::BadEdge => f.write_str("must start and end with a letter or digit"),
        }
    }
}

impl core::error::Error for NameError {}

/// Longest object or node name.
pub const MAX_NAME: usize = 63;

/// Checks an object name (workload, container, node): a DNS label — lowercase
/// letters, digits and `-`, at most 63 characters, starting and ending with a
/// letter or digit.
pub fn check_name(s: &str) -> Result<(), NameError> {
    check(
        s,
        MAX_NAME,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-',
        true,
    )
}

/// Checks a label key: letters, digits, `-`, `_`, `.` and `/`, at most 253
/// characters, starting and ending with a letter or digit.
pub fn check_label_key(s: &str) -> Result<(), NameError> {
    check(
        s,
        253,
        |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'),
        true,
    )
}

/// Checks a label value: may be empty; otherwise letters, digits, `-`, `_` and
/// `.`, at most 63 characters, starting and ending with a letter or digit.
pub fn check_label_value(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Ok(());
    }
    check(
        s,
        63,
        |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'),
        true,
    )
}

fn check(
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    edges: bool,
) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > max {
        return Err(NameError::TooLong { max });
    }
    if let Some((index, ch)) = s.char_indices().find(|&(_, c)| !allowed(c)) {
        return Err(NameError::BadChar { ch, index });
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if edges && !(edge_ok(s.chars().next()) && edge_ok(s.chars().last())) {
        return Err(NameError::BadEdge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(check_name("web-1"), Ok(()));
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(
            check_name("Web"),
            Err(NameError::BadChar { ch: 'W', index: 0 })
        );
        assert_eq!(check_name("-web"), Err(NameError::BadEdge));
        assert_eq!(
            check_name("../etc"),
            Err(NameError::BadChar { ch: '.', index: 0 })
        );
        assert_eq!(
            check_name(&"a".repeat(64)),
            Err(NameError::TooLong { max: 63 })
        );
    }

    #[test]
    fn labels() {
        assert_eq!(check_label_key("flotilla.dev/site"), Ok(()));
        assert_eq!(
            check_label_key("site="),
            Err(NameError::BadChar { ch: '=', index: 4 })
        );
        assert_eq!(check_label_value(""), Ok(()));
        assert_eq!(check_label_value("shop_12"), Ok(()));
        assert_eq!(
            check_label_value("a b"),
            Err(NameError::BadChar { ch: ' ', index: 1 })
        );
    }
}
