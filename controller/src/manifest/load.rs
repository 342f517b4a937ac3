//! Reading manifest text into one YAML value per document, each document
//! parsed on its own so that a syntax error in one does not hide the
//! problems of the others.

use serde::Deserialize;
use serde_norway::Value;
use thiserror::Error;

/// Why a document could not be read as YAML at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LoadError {
    /// The parser stopped at a known place.
    #[error("invalid YAML at line {line}, column {column}: {detail}")]
    Syntax {
        /// 1-based line in the whole input.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's description, its own location removed.
        detail: String,
    },
    /// The parser gave no position (alias expansion limits); the document's
    /// first line is the best we can point at.
    #[error("invalid YAML in the document starting at line {line}: {detail}")]
    Document {
        /// 1-based line where the document starts.
        line: usize,
        /// The parser's description.
        detail: String,
    },
    /// A `<<` merge key whose value is not a map or a list of maps.
    #[error("invalid merge key (<<) in the document starting at line {line}: {detail}")]
    Merge {
        /// 1-based line where the document starts.
        line: usize,
        /// The parser's description.
        detail: String,
    },
}

/// One YAML document of the input.
#[derive(Debug)]
pub struct Document {
    /// 1-based position among all documents, empty ones included, as the
    /// user counts `---` separators.
    pub number: usize,
    /// The document's content; `Value::Null` for an empty document.
    pub value: Result<Value, LoadError>,
}

/// Splits `text` into documents and parses each one.
pub fn documents(text: &str) -> Vec<Document> {
    let mut out = Vec::new();
    for (line_offset, chunk) in chunks(text) {
        // libyaml cannot resume after an error: its next "document" would
        // start mid-mapping (and serde_norway panics on that), so a chunk
        // stops at its first error. Chunks are independent, so later
        // documents are still read.
        for de in serde_norway::Deserializer::from_str(chunk) {
            let number = out.len() + 1;
            let value = Value::deserialize(de)
                .map_err(|e| load_error(&e, line_offset))
                .and_then(|mut v| {
                    v.apply_merge().map_err(|e| LoadError::Merge {
                        line: line_offset + 1,
                        detail: e.to_string(),
                    })?;
                    Ok(v)
                });
            let failed = value.is_err();
            out.push(Document { number, value });
            if failed {
                break;
            }
        }
    }
    out
}

/// Cuts the text at document markers (`---` at the start of a line), which
/// YAML does not allow inside any scalar or collection, so the pieces parse
/// exactly as they would in one stream. Returns each piece with the number
/// of lines before it.
fn chunks(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 0, 0);
    // Whether the current piece holds a document yet: comments and
    // directives before the first marker belong to the document after it.
    let mut started = false;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line) {
            if started {
                out.push((start_line, &text[start..offset]));
                (start, start_line) = (offset, index);
            }
            started = true;
        } else if !is_preamble(line) {
            started = true;
        }
        offset += line.len();
    }
    if start < text.len() {
        out.push((start_line, &text[start..]));
    }
    out
}

fn is_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

fn is_preamble(line: &str) -> bool {
    let line = line.trim_start_matches('\u{feff}').trim_start();
    line.is_empty() || line.starts_with('#') || line.starts_with('%')
}

fn load_error(e: &serde_norway::Error, line_offset: usize) -> LoadError {
    let text = e.to_string();
    match e.location() {
        Some(loc) => {
            let own = format!(" at line {} column {}", loc.line(), loc.column());
            LoadError::Syntax {
                line: loc.line() + line_offset,
                column: loc.column(),
                detail: shift_lines(&text.replacen(&own, "", 1), line_offset),
            }
        }
        None => LoadError::Document {
            line: line_offset + 1,
            detail: text,
        },
    }
}

/// Rewrites every `line N` in a parser message (its context marks) from the
/// piece's numbering to the input's.
fn shift_lines(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_markers_only() {
        assert_eq!(chunks(""), vec![]);
        assert_eq!(chunks("a: 1\n"), vec![(0, "a: 1\n")]);
        assert_eq!(
            chunks("# head\n%YAML 1.2\n---\na: 1\n--- |\n  text\n---x: 2\n  ---\n"),
            vec![
                (0, "# head\n%YAML 1.2\n---\na: 1\n"),
                (4, "--- |\n  text\n---x: 2\n  ---\n"),
            ]
        );
        assert_eq!(
            chunks("a: 1\r\n---\r\nb: 2"),
            vec![(0, "a: 1\r\n"), (1, "---\r\nb: 2")]
        );
    }

    #[test]
    fn numbers_lines_from_the_whole_input() {
        let docs = documents("a: 1\n---\nb: 2\n---\nc: [1,\n");
        assert_eq!(docs.len(), 3);
        assert!(docs[0].value.is_ok() && docs[1].value.is_ok());
        let err = docs[2].value.as_ref().err().map(ToString::to_string);
        assert_eq!(
            err.as_deref(),
            Some(
                "invalid YAML at line 6, column 1: did not find expected node content, \
                 while parsing a flow node"
            )
        );
    }

    #[test]
    fn shifts_context_lines() {
        assert_eq!(
            shift_lines("x, while parsing a block mapping at line 2 column 1", 10),
            "x, while parsing a block mapping at line 12 column 1"
        );
        assert_eq!(shift_lines("no number at line x", 3), "no number at line x");
    }
}
