//! What a rejected configuration reports: one [`Diagnostic`] per problem, each naming the
//! file, line, column and field path, gathered into a [`ConfigError`].

use std::fmt;

/// One problem in a configuration, located in its source.
///
/// Displays as `ORIGIN:LINE:COLUMN: PATH: MESSAGE`, e.g.
/// `fulcrum.yaml:14:18: pools.app.backends[1].address: invalid address "127.0.0.1:99999": port must be 1..=65535`.
/// The `PATH: ` part is left out when `path` is empty (a problem with the file as a whole,
/// such as a YAML syntax error), and `LINE:COLUMN:` when `line` is 0 (no position: an I/O
/// error, or a [`Config`](crate::Config) built in code and checked with
/// [`Config::validate`](crate::Config::validate)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Name of the source, as given to [`parse`](crate::parse) or the path given to
    /// [`load`](crate::load).
    pub origin: String,
    /// 1-based line of the offending node; 0 when there is no position.
    pub line: usize,
    /// 1-based column (in characters) of the offending node; 0 when there is no position.
    pub column: usize,
    /// Field path of the offending node, e.g. `listeners[0].routes[1].pool`; empty for the
    /// document as a whole.
    pub path: String,
    /// What is wrong, naming the offending value and, where it helps, what is expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A configuration that was rejected, with every problem found.
///
/// Syntax and type errors stop parsing at the first one; the semantic checks that follow
/// (references, duplicates, ranges) report all of theirs. Diagnostics are ordered by
/// position. Displays as one line per diagnostic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The problems, at least one, ordered by line and column.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// An error made of `diagnostics`, put in source order.
    pub(crate) fn new(mut diagnostics: Vec<Diagnostic>) -> Self {
        debug_assert!(
            !diagnostics.is_empty(),
            "a ConfigError has at least one diagnostic"
        );
        diagnostics.sort_by_key(|d| (d.line, d.column));
        Self { diagnostics }
    }

    /// An error with one position-less diagnostic about the source as a whole.
    pub(crate) fn whole(origin: &str, message: String) -> Self {
        Self::new(vec![Diagnostic {
            origin: origin.to_owned(),
            line: 0,
            column: 0,
            path: String::new(),
            message,
        }])
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            fmt::Display::fmt(d, f)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(line: usize, path: &str) -> Diagnostic {
        Diagnostic {
            origin: "fulcrum.yaml".into(),
            line,
            column: if line == 0 { 0 } else { 18 },
            path: path.into(),
            message: "broken".into(),
        }
    }

    #[test]
    fn display_forms() {
        assert_eq!(
            diag(14, "pools.app").to_string(),
            "fulcrum.yaml:14:18: pools.app: broken"
        );
        assert_eq!(diag(14, "").to_string(), "fulcrum.yaml:14:18: broken");
        assert_eq!(diag(0, "pools").to_string(), "fulcrum.yaml: pools: broken");
    }

    #[test]
    fn error_lists_one_line_each_in_order() {
        let err = ConfigError::new(vec![diag(9, "b"), diag(3, "a")]);
        assert_eq!(
            err.to_string(),
            "fulcrum.yaml:3:18: a: broken\nfulcrum.yaml:9:18: b: broken"
        );
    }
}
