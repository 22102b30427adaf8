//! The structure ARCHITECTURE.md describes, checked against the tree: the
//! module table (layers, "may not import") is parsed from the document, so
//! the document stays the one source; every `crate::` path in `src/` is
//! checked against it; the files import each other without a circle; and
//! every `src/…` path README.md and ARCHITECTURE.md name exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One row of the module table.
#[derive(Debug)]
struct Row {
    layer: u32,
    /// Module paths this row covers (`grpc`, `grpc::http`, `main.rs`).
    modules: Vec<String>,
    /// Module paths it may not import; `anything`: every other module.
    forbidden: Forbidden,
}

#[derive(Debug)]
enum Forbidden {
    Anything,
    Modules(Vec<String>),
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The backticked words of a table cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// The module table of ARCHITECTURE.md (`| layer | module | owns | may not import |`).
fn module_table() -> Vec<Row> {
    let doc = read("ARCHITECTURE.md");
    let mut lines = doc
        .lines()
        .skip_while(|l| !l.starts_with("| layer | module | owns | may not import |"));
    assert!(lines.next().is_some(), "ARCHITECTURE.md has no module table");
    lines
        .skip(1) // |---|
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 4, "a module table row has four cells: {line}");
            let layer = cells[0]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a row's layer starts with its number: {line}"));
            let modules = backticked(cells[1]);
            assert!(!modules.is_empty(), "a row names its modules in backticks: {line}");
            let forbidden = match cells[3] {
                "anything" => Forbidden::Anything,
                "—" => Forbidden::Modules(Vec::new()),
                cell => {
                    let names = backticked(cell);
                    assert!(
                        !names.is_empty(),
                        "\"may not import\" is `anything`, `—` or backticked modules: {line}"
                    );
                    Forbidden::Modules(names)
                }
            };
            Row {
                layer,
                modules,
                forbidden,
            }
        })
        .collect()
}

/// Every `.rs` file under `src/`, with its module path (`grpc::http`;
/// `""` for lib.rs, `main.rs` for the binary).
fn source_files() -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let module = match parts.as_slice() {
                [one] if one == "lib" => String::new(),
                [one] if one == "main" => "main.rs".into(),
                _ => parts.join("::"),
            };
            (module, path)
        })
        .collect()
}

/// Whether module path `path` is `module` or inside it.
fn within(path: &str, module: &str) -> bool {
    path == module || path.starts_with(&format!("{module}::"))
}

/// The module paths a file refers to through `crate::`, `super::` and its
/// own child modules, with the line; comments are skipped. `pub use` lines
/// (re-exports of a module's children) are not dependencies of its code.
fn references(module: &str, is_mod_file: bool, text: &str) -> Vec<(String, usize)> {
    let mut children = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        for prefix in ["pub mod ", "mod ", "pub(crate) mod "] {
            if let Some(name) = line.strip_prefix(prefix).and_then(|r| r.strip_suffix(';')) {
                children.push(name.to_owned());
            }
        }
    }
    // `super::` of a mod.rs (or lib.rs) is its parent; of any other file, its directory's module.
    let parent_of = |m: &str| m.rsplit_once("::").map(|(p, _)| p.to_owned()).unwrap_or_default();
    let _ = is_mod_file;
    let supers = parent_of(module);
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break; // unit tests, at the end of a file, may reach for any helper
        }
        if code.starts_with("//") || code.starts_with("pub use ") {
            continue;
        }
        let code = code.split(" // ").next().unwrap_or(code);
        for (marker, base) in [("crate::", String::new()), ("super::", supers.clone())] {
            let mut rest = code;
            while let Some(at) = rest.find(marker) {
                let preceded = rest[..at].chars().last();
                rest = &rest[at + marker.len()..];
                if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue; // `flute_token_broker::crate::` never occurs; `super::super::` is read once
                }
                let path = path_segments(rest);
                if marker == "super::" && path.is_empty() {
                    continue;
                }
                let full = match (base.is_empty(), path.is_empty()) {
                    (true, _) => path,
                    (false, true) => base.clone(),
                    (false, false) => format!("{base}::{path}"),
                };
                out.push((full, number + 1));
            }
        }
        if is_mod_file {
            for child in &children {
                let marker = format!("{child}::");
                let mut rest = code;
                while let Some(at) = rest.find(&marker) {
                    let preceded = rest[..at].chars().last();
                    rest = &rest[at + marker.len()..];
                    if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                        continue;
                    }
                    let path = path_segments(rest);
                    let base = if module.is_empty() {
                        child.clone()
                    } else {
                        format!("{module}::{child}")
                    };
                    let full = if path.is_empty() {
                        base
                    } else {
                        format!("{base}::{path}")
                    };
                    out.push((full, number + 1));
                }
            }
        }
    }
    out
}

/// The lowercase path segments at the start of `text` (`grpc::http` of
/// `grpc::http::router(…)`); type names and `{` end it.
fn path_segments(text: &str) -> String {
    let mut segments = Vec::new();
    for segment in text.split("::") {
        let word: String = segment
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if word.is_empty() {
            break;
        }
        let whole = word.len() == segment.len();
        segments.push(word);
        if !whole {
            break;
        }
    }
    segments.join("::")
}

/// The table module that owns `path`: the longest one it is within.
fn owner<'a>(rows: &'a [Row], path: &str) -> Option<(&'a Row, &'a str)> {
    rows.iter()
        .flat_map(|row| row.modules.iter().map(move |m| (row, m.as_str())))
        .filter(|(_, m)| within(path, m))
        .max_by_key(|(_, m)| m.len())
}

#[test]
fn every_import_keeps_to_the_module_table() {
    let rows = module_table();
    let mut problems = Vec::new();
    for (module, path) in source_files() {
        if module.is_empty() || module == "main.rs" {
            continue; // the crate root and the binary sit above every layer
        }
        let Some((row, owned_by)) = owner(&rows, &module) else {
            problems.push(format!(
                "{}: no row of ARCHITECTURE.md's module table covers `{module}`",
                path.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let is_mod = path.ends_with("mod.rs");
        for (target, line) in references(&module, is_mod, &text) {
            let Some((target_row, target_owner)) = owner(&rows, &target) else {
                continue; // the crate root's shared helpers (error_chain, install_crypto_provider)
            };
            if target_owner == owned_by || within(target_owner, owned_by) {
                continue;
            }
            let at = format!("{}:{line}", path.strip_prefix(ROOT).unwrap_or(&path).display());
            if target_row.layer > row.layer {
                problems.push(format!(
                    "{at}: `{owned_by}` (layer {}) uses `{target}` of `{target_owner}` (layer {}): a layer above",
                    row.layer, target_row.layer
                ));
            }
            let refused = match &row.forbidden {
                Forbidden::Anything => true,
                Forbidden::Modules(names) => names.iter().any(|n| within(target_owner, n) || within(&target, n)),
            };
            if refused {
                problems.push(format!(
                    "{at}: `{owned_by}` may not import `{target_owner}` (ARCHITECTURE.md), but uses `{target}`"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "imports against the module table:\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_file_imports_itself_through_a_circle() {
    let files = source_files();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    // The file a module path lands in: its longest prefix that is a file.
    let file_of = |path: &str| -> Option<String> {
        let mut candidate = path.to_owned();
        loop {
            if modules.contains(&candidate) {
                return Some(candidate);
            }
            candidate = candidate.rsplit_once("::")?.0.to_owned();
        }
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        if module.is_empty() || module == "main.rs" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        for (target, _) in references(module, path.ends_with("mod.rs"), &text) {
            let Some(target) = file_of(&target) else { continue };
            // A module's own items (its mod.rs) enclose its files: not an arrow.
            if target.is_empty() || target == *module || within(module, &target) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut circle = stack[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, stack, done) {
                return Some(circle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(circle) = visit(node, &edges, &mut Vec::new(), &mut done) {
            panic!("an import circle: {}", circle.join(" → "));
        }
    }
}

#[test]
fn every_source_path_the_documents_name_exists() {
    let mut missing = Vec::new();
    for doc in ["README.md", "ARCHITECTURE.md"] {
        let text = read(doc);
        let mut rest = text.as_str();
        while let Some(at) = rest.find("src/") {
            let preceded = rest[..at].chars().last();
            rest = &rest[at..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '/' | '.' | '-')))
                .unwrap_or(rest.len());
            let named = rest[..end].trim_end_matches('.');
            rest = &rest[end..];
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '/' || c == '_') {
                continue; // a path inside another (…/src/…)
            }
            if (named.ends_with(".rs") || named.ends_with('/')) && !Path::new(ROOT).join(named).exists() {
                missing.push(format!("{doc}: {named}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "paths named in the documents that do not exist:\n{}",
        missing.join("\n")
    );
}

/// The checks above find what they are meant to find.
#[test]
fn the_checks_read_paths_as_written() {
    assert_eq!(path_segments("daemon::token_store::FD_NAME;"), "daemon::token_store");
    assert_eq!(path_segments("grpc::{self, pb};"), "grpc");
    assert_eq!(path_segments("serve::serve(listener"), "serve::serve");
    let refs = references(
        "grpc::listener",
        false,
        "use crate::daemon::token_store::FD_NAME;\n// crate::x\n",
    );
    assert_eq!(refs, vec![("daemon::token_store".to_owned(), 1)]);
    let refs = references("token::endpoint", false, "use super::source::{Call, Failure};\n");
    assert_eq!(refs, vec![("token::source".to_owned(), 1)]);
    let refs = references(
        "token",
        true,
        "mod source;\npub use source::Snapshot;\nlet t = source::start(c);\n",
    );
    assert_eq!(refs, vec![("token::source::start".to_owned(), 3)]);
}
