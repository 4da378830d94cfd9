//! Environment expansion of the raw configuration text, before YAML parsing.
//!
//! `${VAR}` becomes the value of `VAR`, `${VAR:-default}` the value or, when `VAR` is unset
//! or empty, `default`; `$${` is a literal `${`. Lines whose first non-blank character is
//! `#` are comments and are left alone, so a commented-out `${TOKEN}` needs no variable.
//! A value may not contain a line break, so line numbers stay those of the file; the
//! [`ColumnMap`] turns columns of the expanded text back into columns of the file.

use std::collections::HashMap;

/// A problem found while expanding, at a 1-based line and column of the original text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EnvProblem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// One replacement on a line: `orig_len` characters at `orig_start` became `exp_len`
/// characters at `exp_start` (0-based character columns).
#[derive(Clone, Copy, Debug)]
struct Splice {
    exp_start: usize,
    exp_len: usize,
    orig_start: usize,
    orig_len: usize,
}

/// Maps positions in the expanded text back to the original text. Lines are unchanged by
/// expansion; columns after a replacement shift.
#[derive(Clone, Debug, Default)]
pub(crate) struct ColumnMap {
    /// Replacements per 1-based line, in column order.
    lines: HashMap<usize, Vec<Splice>>,
}

impl ColumnMap {
    /// The 1-based column in the original text of 1-based `column` on `line` of the
    /// expanded text. A column inside a replaced value maps to the start of its `${`.
    pub fn original(&self, line: usize, column: usize) -> usize {
        let Some(splices) = self.lines.get(&line) else {
            return column;
        };
        let col0 = column.saturating_sub(1);
        // Columns past the last replacement before `col0` are shifted by its length change.
        let mut shift: isize = 0;
        for s in splices {
            if col0 < s.exp_start {
                break;
            }
            if col0 < s.exp_start + s.exp_len {
                return s.orig_start + 1;
            }
            shift = (s.orig_start + s.orig_len) as isize - (s.exp_start + s.exp_len) as isize;
        }
        (col0 as isize + shift).max(0) as usize + 1
    }
}

/// The expanded text and how to map its columns back.
#[derive(Clone, Debug)]
pub(crate) struct Expanded {
    pub text: String,
    pub columns: ColumnMap,
}

/// Expands `${VAR}`, `${VAR:-default}` and `$${` in `source`, reading variables through
/// `lookup`. Reports every problem (unset variable, bad name, unterminated `${`, value with
/// a line break), not just the first.
pub(crate) fn expand(
    source: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Expanded, Vec<EnvProblem>> {
    let mut text = String::with_capacity(source.len());
    let mut columns = ColumnMap::default();
    let mut problems = Vec::new();
    for (i, raw_line) in source.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        if !raw_line.contains("${") || raw_line.trim_start().starts_with('#') {
            text.push_str(raw_line);
            continue;
        }
        let splices = expand_line(raw_line, line_no, lookup, &mut text, &mut problems);
        if !splices.is_empty() {
            columns.lines.insert(line_no, splices);
        }
    }
    if problems.is_empty() {
        Ok(Expanded { text, columns })
    } else {
        Err(problems)
    }
}

/// Expands one line (with its line break, if any) into `out`; returns its replacements.
fn expand_line(
    line: &str,
    line_no: usize,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
    problems: &mut Vec<EnvProblem>,
) -> Vec<Splice> {
    let chars: Vec<char> = line.chars().collect();
    let mut splices = Vec::new();
    let mut exp_col = 0;
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['$', '$', '{']) {
            out.push_str("${");
            splices.push(Splice {
                exp_start: exp_col,
                exp_len: 2,
                orig_start: i,
                orig_len: 3,
            });
            exp_col += 2;
            i += 3;
            continue;
        }
        if !rest.starts_with(&['$', '{']) {
            out.push(chars[i]);
            exp_col += 1;
            i += 1;
            continue;
        }
        let problem = |message: String| EnvProblem {
            line: line_no,
            column: i + 1,
            message,
        };
        let Some(close) = rest.iter().position(|&c| c == '}') else {
            problems.push(problem(
                "unterminated `${`: missing `}` on this line".to_owned(),
            ));
            // Keep the rest of the line as it is; the problem is already reported.
            out.extend(rest);
            break;
        };
        let body: String = rest[2..close].iter().collect();
        let (name, default) = match body.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (body.as_str(), None),
        };
        let value = if !is_variable_name(name) {
            problems.push(problem(format!(
                "invalid environment variable reference `${{{body}}}`: a name is letters, \
                 digits and `_`, not starting with a digit (use `$${{` for a literal `${{`)"
            )));
            None
        } else if default.is_some_and(|d| d.contains("${")) {
            problems.push(problem(format!(
                "nested `${{` in the default of `${{{body}}}` is not supported"
            )));
            None
        } else {
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => Some(v),
                (None, Some(d)) => Some(d.to_owned()),
                (None, None) => {
                    problems.push(problem(format!(
                        "environment variable `{name}` is not set or empty (write \
                         `${{{name}:-default}}` to give a default)"
                    )));
                    None
                }
            }
        };
        let value = match value {
            Some(v) if v.contains(['\n', '\r']) => {
                problems.push(problem(format!(
                    "environment variable `{name}` contains a line break; multi-line values \
                     are not supported"
                )));
                String::new()
            }
            Some(v) => v,
            None => String::new(),
        };
        let exp_len = value.chars().count();
        out.push_str(&value);
        splices.push(Splice {
            exp_start: exp_col,
            exp_len,
            orig_start: i,
            orig_len: close + 1,
        });
        exp_col += exp_len;
        i += close + 1;
    }
    splices
}

/// Whether `name` is a portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8081".into()),
            "LONG" => Some("a-rather-long-value".into()),
            "EMPTY" => Some(String::new()),
            "MULTI" => Some("a\nb".into()),
            _ => None,
        }
    }

    fn ok(src: &str) -> String {
        expand(src, &env).expect("expands").text
    }

    fn problems(src: &str) -> Vec<EnvProblem> {
        expand(src, &env).expect_err("fails")
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        assert_eq!(ok("a: 127.0.0.1:${PORT}\n"), "a: 127.0.0.1:8081\n");
        assert_eq!(ok("a: ${NOPE:-x y}\n"), "a: x y\n");
        assert_eq!(ok("a: ${EMPTY:-d}\n"), "a: d\n");
        assert_eq!(ok("a: ${NOPE:-}\n"), "a: \n");
        assert_eq!(ok("a: ${PORT:-1}${PORT}"), "a: 80818081");
    }

    #[test]
    fn dollar_dollar_brace_is_literal() {
        assert_eq!(ok("a: $${NOPE} $5 $$\n"), "a: ${NOPE} $5 $$\n");
    }

    #[test]
    fn comment_lines_are_not_expanded() {
        assert_eq!(
            ok("  # token: ${NOPE}\na: 1\n"),
            "  # token: ${NOPE}\na: 1\n"
        );
    }

    #[test]
    fn unset_variable_is_located() {
        let p = problems("a: 1\nb: x ${NOPE} ${ALSO_NOT}\n");
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].line, p[0].column), (2, 6));
        assert!(
            p[0].message.contains("`NOPE` is not set"),
            "{}",
            p[0].message
        );
        assert_eq!((p[1].line, p[1].column), (2, 14));
    }

    #[test]
    fn bad_references_are_reported() {
        assert!(
            problems("a: ${1X}")[0]
                .message
                .contains("invalid environment variable")
        );
        assert!(
            problems("a: ${}")[0]
                .message
                .contains("invalid environment variable")
        );
        assert!(problems("a: ${X")[0].message.contains("unterminated"));
        assert!(problems("a: ${MULTI}")[0].message.contains("line break"));
        assert!(problems("a: ${X:-${Y}}")[0].message.contains("nested"));
    }

    #[test]
    fn columns_map_back_to_the_original() {
        let e = expand("k: ${LONG} v\nx: $${y} z\n", &env).unwrap();
        assert_eq!(e.text, "k: a-rather-long-value v\nx: ${y} z\n");
        // Before the replacement: unchanged.
        assert_eq!(e.columns.original(1, 1), 1);
        // Inside the value: the `${`.
        assert_eq!(e.columns.original(1, 4), 4);
        assert_eq!(e.columns.original(1, 10), 4);
        // After it: shifted back. `v` is column 24 expanded, 12 original.
        assert_eq!(e.columns.original(1, 24), 12);
        // `z` is column 9 expanded, 10 original.
        assert_eq!(e.columns.original(2, 9), 10);
        assert_eq!(e.columns.original(3, 7), 7);
    }
}
