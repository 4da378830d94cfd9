//! Every file in `tests/invalid/` is a config that must be rejected, and says how in its
//! header: one `# expect: LINE:COLUMN PATH: MESSAGE` line per diagnostic, in order, where
//! PATH is `.` for the document as a whole and MESSAGE is a prefix of the message. The
//! files double as examples of each error class.

use std::fs;
use std::path::Path;

/// One expected diagnostic.
#[derive(Debug)]
struct Expect {
    line: usize,
    column: usize,
    path: String,
    message: String,
}

fn expectations(source: &str, file: &str) -> Vec<Expect> {
    source
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|e| {
            let (pos, rest) = e
                .split_once(' ')
                .unwrap_or_else(|| panic!("{file}: bad expect {e}"));
            let (line, column) = pos.split_once(':').expect("LINE:COLUMN");
            let (path, message) = rest.split_once(": ").expect("PATH: MESSAGE");
            Expect {
                line: line.parse().expect("line"),
                column: column.parse().expect("column"),
                path: if path == "." {
                    String::new()
                } else {
                    path.to_owned()
                },
                message: message.to_owned(),
            }
        })
        .collect()
}

#[test]
fn every_invalid_config_is_rejected_as_its_header_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the invalid set went missing: {files:?}");
    let mut failures = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let source = fs::read_to_string(&path).unwrap();
        let expected = expectations(&source, &name);
        assert!(!expected.is_empty(), "{name} has no `# expect:` line");
        let err = match fulcrum_config::parse(&source, &name) {
            Ok(_) => {
                failures.push(format!("{name}: accepted"));
                continue;
            }
            Err(err) => err,
        };
        let matches = err.diagnostics.len() == expected.len()
            && err.diagnostics.iter().zip(&expected).all(|(d, e)| {
                d.origin == name
                    && (d.line, d.column) == (e.line, e.column)
                    && d.path == e.path
                    && d.message.starts_with(&e.message)
            });
        if !matches {
            failures.push(format!("{name}: expected {expected:#?}\ngot:\n{err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn load_names_the_file_and_reads_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let err = fulcrum_config::load(&dir.join("empty_pool.yaml")).unwrap_err();
    let d = &err.diagnostics[0];
    assert!(
        d.origin.ends_with("tests/invalid/empty_pool.yaml"),
        "{}",
        d.origin
    );
    assert_eq!((d.line, d.column), (11, 3));
    assert!(
        err.to_string()
            .contains("empty_pool.yaml:11:3: pools.api.backends: pool `api`")
    );
}

#[test]
fn load_reports_an_unreadable_file() {
    let err = fulcrum_config::load(Path::new("/nonexistent/fulcrum.yaml")).unwrap_err();
    assert_eq!(err.diagnostics.len(), 1);
    let d = &err.diagnostics[0];
    assert_eq!((d.line, d.column, d.path.as_str()), (0, 0, ""));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/fulcrum.yaml: cannot read config file: "),
        "{err}"
    );
}
