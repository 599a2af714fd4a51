//! List filters in containerd's filter syntax (`filters/parser.go`), for the
//! fields containerd's own snapshot stores expose: `name`, `parent`, `kind`
//! and `labels.<key>`.
//!
//! A filter is selectors joined by `,` (all must match); the request's
//! filters are alternatives (any may match). A selector is a field path
//! alone (the field is present and not empty), or a path, an operator (`==`,
//! `!=`, `~=` a regular expression) and a value. Path parts and values may
//! be quoted with `"` (with `\` escapes), and values also with `/` or `|`.

use crate::error::{Error, Result};
use crate::table::SnapshotInfo;

/// At most this many filters per request, each at most this long.
pub const MAX_FILTERS: usize = 64;
pub const MAX_FILTER_BYTES: usize = 4096;
/// A compiled regular expression may take at most this much memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex::Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    operator: Operator,
}

/// Any of several filters (no filters: everything matches).
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Selector>>);

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters> {
        if filters.len() > MAX_FILTERS {
            return Err(Error::InvalidArgument(format!(
                "more than {MAX_FILTERS} filters"
            )));
        }
        let mut all = Vec::new();
        for f in filters {
            if f.len() > MAX_FILTER_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "filter longer than {MAX_FILTER_BYTES} bytes"
                )));
            }
            // containerd skips empty filters.
            if f.trim().is_empty() {
                continue;
            }
            all.push(
                parse_one(f)
                    .map_err(|why| Error::InvalidArgument(format!("filter {f:?}: {why}")))?,
            );
        }
        Ok(Filters(all))
    }

    pub fn matches(&self, info: &SnapshotInfo) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|selectors| selectors.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &SnapshotInfo) -> bool {
        let value: Option<&str> = match self.path.first().map(String::as_str) {
            Some("name") if self.path.len() == 1 => Some(&info.name),
            Some("parent") if self.path.len() == 1 => Some(&info.parent),
            Some("kind") if self.path.len() == 1 => Some(info.kind.as_str()),
            Some("labels") if self.path.len() > 1 => info
                .labels
                .get(&self.path[1..].join("."))
                .map(String::as_str),
            _ => None,
        };
        match (&self.operator, value) {
            (Operator::Present, v) => v.is_some_and(|v| !v.is_empty()),
            (Operator::Equal(want), Some(v)) => v == want,
            (Operator::NotEqual(want), Some(v)) => v != want,
            (Operator::NotEqual(_), None) => true,
            (Operator::Matches(re), Some(v)) => re.is_match(v),
            (_, None) => false,
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    at: usize,
}

impl Lexer<'_> {
    fn skip_space(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn rest_starts(&self, p: &str) -> bool {
        self.s[self.at..].starts_with(p.as_bytes())
    }

    /// A quoted string starting at the current quote character.
    fn quoted(&mut self) -> std::result::Result<String, String> {
        let quote = self.s[self.at];
        self.at += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.at += 1;
            if c == quote {
                return String::from_utf8(out).map_err(|_| "not UTF-8".into());
            }
            if c == b'\\' && quote == b'"' {
                let Some(next) = self.peek() else { break };
                self.at += 1;
                out.push(match next {
                    b'n' => b'\n',
                    b't' => b'\t',
                    other => other,
                });
            } else {
                out.push(c);
            }
        }
        Err("unterminated quote".into())
    }

    /// A bare run of bytes up to one of `stop` or white space.
    fn bare(&mut self, stop: &[u8]) -> String {
        let start = self.at;
        while let Some(c) = self.peek() {
            if c.is_ascii_whitespace() || stop.contains(&c) {
                break;
            }
            self.at += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.at]).into_owned()
    }
}

fn parse_one(f: &str) -> std::result::Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: f.as_bytes(),
        at: 0,
    };
    let mut selectors = Vec::new();
    loop {
        lx.skip_space();
        let mut path = Vec::new();
        loop {
            let part = if lx.peek() == Some(b'"') {
                lx.quoted()?
            } else {
                lx.bare(b".,=!~\"")
            };
            if part.is_empty() {
                return Err(format!("expected a field name at byte {}", lx.at));
            }
            path.push(part);
            if lx.peek() == Some(b'.') {
                lx.at += 1;
            } else {
                break;
            }
        }
        lx.skip_space();
        let op = ["==", "!=", "~="].into_iter().find(|op| lx.rest_starts(op));
        let operator = match op {
            None => Operator::Present,
            Some(op) => {
                lx.at += 2;
                lx.skip_space();
                let value = match lx.peek() {
                    Some(b'"' | b'/' | b'|') => lx.quoted()?,
                    _ => lx.bare(b","),
                };
                match op {
                    "==" => Operator::Equal(value),
                    "!=" => Operator::NotEqual(value),
                    _ => Operator::Matches(
                        regex::RegexBuilder::new(&value)
                            .size_limit(REGEX_SIZE_LIMIT)
                            .build()
                            .map_err(|e| format!("bad regular expression: {e}"))?,
                    ),
                }
            }
        };
        selectors.push(Selector { path, operator });
        lx.skip_space();
        match lx.peek() {
            None => return Ok(selectors),
            Some(b',') => lx.at += 1,
            Some(c) => return Err(format!("unexpected {:?} at byte {}", c as char, lx.at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Kind;

    fn info() -> SnapshotInfo {
        SnapshotInfo {
            name: "ns/1/sha256:abc".into(),
            parent: "ns/0/base".into(),
            kind: Kind::Committed,
            labels: [
                ("containerd.io/gc.root".to_string(), "now".to_string()),
                ("plain".to_string(), "yes".to_string()),
            ]
            .into_iter()
            .collect(),
            created: Default::default(),
            updated: Default::default(),
        }
    }

    fn m(filters: &[&str]) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&f).unwrap().matches(&info())
    }

    #[test]
    fn selectors_match_like_containerd() {
        assert!(m(&[]));
        assert!(m(&[""]));
        assert!(m(&["kind==committed"]));
        assert!(!m(&["kind==active"]));
        assert!(m(&["kind==active", "kind==committed"]));
        assert!(m(&[r#"labels."containerd.io/gc.root""#]));
        assert!(m(&[r#"labels."containerd.io/gc.root"==now"#]));
        assert!(m(&["labels.plain==yes,kind!=view"]));
        assert!(!m(&["labels.plain==yes,kind==view"]));
        assert!(m(&[r#"name~="^ns/1/""#]));
        assert!(m(&["name~=/sha256/"]));
        assert!(m(&["parent==ns/0/base"]));
        assert!(!m(&["labels.missing"]));
        assert!(m(&["labels.missing!=x"]));
        assert!(!m(&["unknownfield==x"]));
    }

    #[test]
    fn bad_filters_are_invalid_arguments() {
        for bad in [
            "kind==",
            "==x",
            r#"labels."open"#,
            "name~=(",
            "a b",
            "kind==x y",
        ] {
            let r = Filters::parse(&[bad.to_string()]);
            // `kind==` means "equals the empty string" in containerd too.
            if bad == "kind==" {
                assert!(r.is_ok());
                continue;
            }
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{bad:?} gave {r:?}"
            );
        }
        let many = vec!["kind==view".to_string(); MAX_FILTERS + 1];
        assert!(Filters::parse(&many).is_err());
    }
}
