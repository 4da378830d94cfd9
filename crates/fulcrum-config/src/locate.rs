//! Where each field of the YAML text is: a field path → position index built from a marked
//! YAML parse, so that checks made after deserialization can point at a line and column.
//!
//! Paths use the same form as `serde_path_to_error` and the diagnostics:
//! `pools.app.backends[1].address`. The index also finds duplicate mapping keys, which serde
//! would otherwise pass over silently for maps (the last one wins) or report at the wrong
//! line for structs.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column (in characters) of the parsed text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(m: Marker) -> Self {
        Self {
            line: m.line().max(1),
            column: m.col() + 1,
        }
    }

    /// The start of the text.
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// Which position of a field a diagnostic points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// The field's key (`app:` of a pool); its value for sequence items, which have none.
    Key,
    /// The field's value (`127.0.0.1:99999` of an address).
    Value,
}

/// Positions of one field.
#[derive(Clone, Copy, Debug)]
struct Node {
    key: Option<Pos>,
    value: Pos,
}

/// A mapping key given twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DuplicateKey {
    /// Path of the field the key names.
    pub path: String,
    /// The key itself.
    pub key: String,
    /// Position of the second occurrence.
    pub at: Pos,
    /// Position of the first occurrence.
    pub first: Pos,
}

/// A YAML syntax error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub at: Pos,
    pub message: String,
}

/// Field path → position of every node of the first YAML document.
#[derive(Clone, Debug, Default)]
pub(crate) struct SourceIndex {
    nodes: HashMap<String, Node>,
    /// Mapping keys given twice, in source order.
    pub duplicates: Vec<DuplicateKey>,
}

/// An open collection while walking the event stream.
enum Frame {
    Map {
        path: String,
        /// The key whose value comes next, with its position; `None` while expecting a key.
        key: Option<(String, Pos)>,
        seen: HashMap<String, Pos>,
        /// Whether the mapping's position still has to be moved to its first key (block
        /// mappings are reported by the parser at an odd place).
        fix_position: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl SourceIndex {
    /// Indexes `text`. Only the first document is indexed (a second one is reported by the
    /// deserializer). Aliases are indexed at the alias, not expanded.
    pub fn build(text: &str) -> Result<Self, SyntaxError> {
        let lines: Vec<&str> = text.lines().collect();
        let mut index = SourceIndex::default();
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<Frame> = Vec::new();
        loop {
            let (event, marker) = parser.next_token().map_err(|e| SyntaxError {
                at: Pos::from_marker(*e.marker()),
                message: e.info().to_owned(),
            })?;
            let pos = Pos::from_marker(marker);
            match event {
                Event::StreamEnd | Event::DocumentEnd => break,
                Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
                Event::SequenceEnd | Event::MappingEnd => {
                    stack.pop();
                }
                Event::Scalar(ref value, ..) => {
                    index.node(&mut stack, pos, Some(value));
                }
                Event::Alias(_) => {
                    index.node(&mut stack, pos, None);
                }
                Event::SequenceStart(..) => {
                    let path = index.node(&mut stack, pos, None);
                    stack.push(Frame::Seq { path, next: 0 });
                }
                Event::MappingStart(..) => {
                    let path = index.node(&mut stack, pos, None);
                    let flow = lines
                        .get(pos.line - 1)
                        .and_then(|l| l.chars().nth(pos.column - 1))
                        .is_some_and(|c| c == '{');
                    stack.push(Frame::Map {
                        path,
                        key: None,
                        seen: HashMap::new(),
                        fix_position: !flow,
                    });
                }
            }
        }
        Ok(index)
    }

    /// Records a node starting at `pos` under the innermost open collection and returns
    /// its path. `scalar` is its text when it is a scalar (needed when it is a key).
    fn node(&mut self, stack: &mut [Frame], pos: Pos, scalar: Option<&String>) -> String {
        let (path, key) = match stack.last_mut() {
            None => (String::new(), None),
            Some(Frame::Seq { path, next }) => {
                let child = format!("{path}[{next}]");
                *next += 1;
                (child, None)
            }
            Some(Frame::Map {
                path,
                key,
                seen,
                fix_position,
            }) => match key.take() {
                Some((name, key_pos)) => (join(path, &name), Some(key_pos)),
                None => {
                    // This node is a key. Complex (collection) keys get the name `?`.
                    let name = scalar.cloned().unwrap_or_else(|| "?".to_owned());
                    let map_path = path.clone();
                    if std::mem::take(fix_position)
                        && let Some(node) = self.nodes.get_mut(&map_path)
                    {
                        node.value = pos;
                    }
                    if scalar.is_some() && name != "<<" {
                        match seen.entry(name.clone()) {
                            Entry::Occupied(first) => self.duplicates.push(DuplicateKey {
                                path: join(&map_path, &name),
                                key: name.clone(),
                                at: pos,
                                first: *first.get(),
                            }),
                            Entry::Vacant(slot) => {
                                slot.insert(pos);
                            }
                        }
                    }
                    *key = Some((name.clone(), pos));
                    // A complex key's own children are indexed under `path.?`; nothing
                    // looks them up.
                    return join(&map_path, "?");
                }
            },
        };
        // The first occurrence of a duplicated key keeps its position.
        self.nodes
            .entry(path.clone())
            .or_insert(Node { key, value: pos });
        path
    }

    /// Whether the text has a node at exactly `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// Position of the node at exactly `path`, if the text has one.
    pub fn exact(&self, path: &str, anchor: Anchor) -> Option<Pos> {
        self.nodes.get(path).map(|n| match anchor {
            Anchor::Key => n.key.unwrap_or(n.value),
            Anchor::Value => n.value,
        })
    }

    /// Position for a diagnostic about `path`: the node itself if the text has it,
    /// otherwise the key of its nearest ancestor that it has (a field left to its default
    /// is reported at the block it is missing from), otherwise the start of the text.
    pub fn locate(&self, path: &str, anchor: Anchor) -> Pos {
        if let Some(pos) = self.exact(path, anchor) {
            return pos;
        }
        let mut p = path;
        while let Some(parent) = parent(p) {
            if let Some(pos) = self.exact(parent, Anchor::Key) {
                return pos;
            }
            p = parent;
        }
        Pos::START
    }

    /// Path of the innermost node that starts on `line` at or before `column`, if any:
    /// used to name the field an environment reference sits in.
    pub fn path_at(&self, line: usize, column: usize) -> Option<&str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.value.line == line && n.value.column <= column)
            .max_by_key(|(path, n)| (n.value.column, path.len()))
            .map(|(path, _)| path.as_str())
    }
}

/// `parent.key`, or `key` at the root.
fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The parent of a field path: `a.b[2]` → `a.b` → `a` → `` → none.
pub(crate) fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']')
        && let Some(open) = path.rfind('[')
    {
        return Some(&path[..open]);
    }
    Some(path.rfind('.').map_or("", |dot| &path[..dot]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "\
pools:
  app:
    strategy: x
    backends:
      - { address: a, weight: 2 }
      - address: b
listeners:
- name: a
  k: &x [1]
  j: *x
";

    #[test]
    fn indexes_keys_and_values() {
        let idx = SourceIndex::build(SRC).unwrap();
        let at = |p, a| idx.exact(p, a).map(|p| (p.line, p.column));
        assert_eq!(at("pools", Anchor::Key), Some((1, 1)));
        assert_eq!(at("pools.app", Anchor::Key), Some((2, 3)));
        // A block mapping is placed at its first key.
        assert_eq!(at("pools.app", Anchor::Value), Some((3, 5)));
        assert_eq!(at("pools.app.strategy", Anchor::Value), Some((3, 15)));
        assert_eq!(at("pools.app.backends[0]", Anchor::Value), Some((5, 9)));
        assert_eq!(
            at("pools.app.backends[0].weight", Anchor::Value),
            Some((5, 31))
        );
        assert_eq!(at("pools.app.backends[1]", Anchor::Key), Some((6, 9)));
        assert_eq!(
            at("pools.app.backends[1].address", Anchor::Value),
            Some((6, 18))
        );
        assert_eq!(at("listeners[0].name", Anchor::Value), Some((8, 9)));
        assert_eq!(at("listeners[0].k[0]", Anchor::Value), Some((9, 10)));
        assert_eq!(at("listeners[0].j", Anchor::Value), Some((10, 6)));
        assert_eq!(at("listeners[0].j[0]", Anchor::Value), None);
    }

    #[test]
    fn locate_falls_back_to_the_nearest_ancestor_key() {
        let idx = SourceIndex::build(SRC).unwrap();
        assert_eq!(
            idx.locate("pools.app.health_check.timeout", Anchor::Value),
            Pos { line: 2, column: 3 }
        );
        assert_eq!(idx.locate("runtime.threads", Anchor::Value), Pos::START);
    }

    #[test]
    fn finds_duplicate_keys() {
        let idx = SourceIndex::build("pools:\n  a: {}\n  b: {}\n  a: {x: 1, x: 2}\n").unwrap();
        let dups: Vec<_> = idx
            .duplicates
            .iter()
            .map(|d| (d.path.as_str(), d.at.line, d.first.line))
            .collect();
        assert_eq!(dups, [("pools.a", 4, 2), ("pools.a.x", 4, 4)]);
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = SourceIndex::build("a:\n  - b\n c: [\n").unwrap_err();
        assert!(err.at.line >= 2, "{err:?}");
    }

    #[test]
    fn parents() {
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a.b"), Some("a"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
    }

    #[test]
    fn path_at_picks_the_innermost_node_on_the_line() {
        let idx = SourceIndex::build(SRC).unwrap();
        assert_eq!(idx.path_at(5, 21), Some("pools.app.backends[0].address"));
        assert_eq!(idx.path_at(3, 20), Some("pools.app.strategy"));
    }
}
