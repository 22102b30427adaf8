//! The structure ARCHITECTURE.md describes, checked against the tree: the
//! module table (layers, "may not import") is parsed from the document, so
//! the document stays the one source; every reference to a module of the
//! crate in `src/` (read as Rust syntax with `syn`: imports, paths in code
//! and types, paths in macros) is checked against it; the files import
//! each other without a circle; and every `src/…` path README.md and
//! ARCHITECTURE.md name exists.

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

/// The module paths a file refers to, read as Rust syntax: every `use`
/// (grouped `{…}` and nested trees expanded, `pub use` included), every
/// path in code and types, and the paths inside macro invocations, that
/// start with `crate::`, `self::`, `super::` (any number of them, from the
/// module the path is written in, inline modules included) or a child
/// module the file declares. Test modules count like any other code. Each
/// comes with what was written, to show in a report.
fn references(module: &str, text: &str) -> Vec<(String, String)> {
    let file = syn::parse_file(text).unwrap_or_else(|e| panic!("{module}: not Rust syntax: {e}"));
    let current: Vec<String> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").map(str::to_owned).collect()
    };
    let mut reader = Reader {
        scopes: vec![Scope::of(current, &file.items)],
        out: Vec::new(),
    };
    syn::visit::Visit::visit_file(&mut reader, &file);
    reader.out
}

/// A module being read: its path and the child modules it declares.
struct Scope {
    path: Vec<String>,
    children: BTreeSet<String>,
}

impl Scope {
    fn of(path: Vec<String>, items: &[syn::Item]) -> Self {
        let children = items
            .iter()
            .filter_map(|item| match item {
                syn::Item::Mod(m) => Some(m.ident.to_string()),
                _ => None,
            })
            .collect();
        Self { path, children }
    }
}

struct Reader {
    scopes: Vec<Scope>,
    out: Vec<(String, String)>,
}

impl Reader {
    /// Records `segments` (as written) when they name a module of this crate.
    fn record(&mut self, segments: &[String]) {
        let scope = self.scopes.last().expect("a scope");
        let Some(first) = segments.first() else { return };
        let mut base: Vec<String>;
        let rest: &[String];
        match first.as_str() {
            "crate" => {
                base = Vec::new();
                rest = &segments[1..];
            }
            "self" => {
                base = scope.path.clone();
                rest = &segments[1..];
            }
            "super" => {
                base = scope.path.clone();
                let supers = segments.iter().take_while(|s| *s == "super").count();
                for _ in 0..supers {
                    base.pop();
                }
                rest = &segments[supers..];
            }
            name if scope.children.contains(name) => {
                base = scope.path.clone();
                rest = segments;
            }
            _ => return,
        }
        // Module and item names are lowercase; a type or a constant ends the module path.
        base.extend(
            rest.iter()
                .take_while(|s| {
                    s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                })
                .cloned(),
        );
        let target = base.join("::");
        if !target.is_empty() {
            self.out.push((target, segments.join("::")));
        }
    }

    /// Every path a `use` tree names, with its prefix.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.record(&full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                if r.ident != "self" {
                    full.push(r.ident.to_string());
                }
                self.record(&full);
            }
            syn::UseTree::Glob(_) => {
                let full = prefix.clone();
                self.record(&full);
            }
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    /// `crate :: a :: b` and the like inside a macro's tokens.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        use proc_macro2::TokenTree;
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut at = 0;
        while at < trees.len() {
            if let TokenTree::Group(group) = &trees[at] {
                self.tokens(group.stream());
                at += 1;
                continue;
            }
            let starts = matches!(&trees[at], TokenTree::Ident(i) if i == "crate" || i == "super" || i == "self")
                && !(at >= 1 && matches!(&trees[at - 1], TokenTree::Punct(p) if p.as_char() == ':'));
            if !starts {
                at += 1;
                continue;
            }
            let mut segments = vec![trees[at].to_string()];
            let mut next = at + 1;
            while next + 2 < trees.len() + 1
                && matches!(trees.get(next), Some(TokenTree::Punct(p)) if p.as_char() == ':')
                && matches!(trees.get(next + 1), Some(TokenTree::Punct(p)) if p.as_char() == ':')
            {
                match trees.get(next + 2) {
                    Some(TokenTree::Ident(i)) => {
                        segments.push(i.to_string());
                        next += 3;
                    }
                    _ => break,
                }
            }
            if segments.len() > 1 {
                self.record(&segments);
            }
            at = next;
        }
    }
}

impl<'ast> syn::visit::Visit<'ast> for Reader {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        let Some((_, items)) = &item.content else { return };
        let mut path = self.scopes.last().expect("a scope").path.clone();
        path.push(item.ident.to_string());
        self.scopes.push(Scope::of(path, items));
        for item in items {
            self.visit_item(item);
        }
        self.scopes.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.leading_colon.is_none() {
            let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
            self.record(&segments);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.visit_path(&mac.path);
        self.tokens(mac.tokens.clone());
    }
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
        for (target, written) in references(&module, &text) {
            let Some((target_row, target_owner)) = owner(&rows, &target) else {
                continue; // the crate root's shared helpers (error_chain, install_crypto_provider)
            };
            if target_owner == owned_by || within(target_owner, owned_by) {
                continue;
            }
            let at = format!("{} (`{written}`)", path.strip_prefix(ROOT).unwrap_or(&path).display());
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

/// The arrows between files: file module → the files it refers to (a
/// module's own items, its mod.rs, enclose its files: not an arrow).
fn file_arrows(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
    // The file a module path lands in: its longest prefix that is a file.
    let file_of = |path: &str| -> Option<String> {
        let mut candidate = path.to_owned();
        loop {
            if modules.contains(candidate.as_str()) {
                return Some(candidate);
            }
            candidate = candidate.rsplit_once("::")?.0.to_owned();
        }
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in files {
        if module.is_empty() || module == "main.rs" {
            continue;
        }
        for (target, _) in references(module, text) {
            let Some(target) = file_of(&target) else { continue };
            if target.is_empty() || target == *module || within(module, &target) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    edges
}

/// A circle among the arrows, if any (depth-first search for a back edge).
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
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
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_file_imports_itself_through_a_circle() {
    let files: Vec<(String, String)> = source_files()
        .into_iter()
        .map(|(module, path)| (module, std::fs::read_to_string(path).unwrap()))
        .collect();
    if let Some(circle) = circle(&file_arrows(&files)) {
        panic!("an import circle: {}", circle.join(" → "));
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

/// The checks above find what they are meant to find, in the spellings a
/// line-by-line reading missed.
#[test]
fn the_checks_read_imports_as_rust_does() {
    let targets = |module: &str, text: &str| -> Vec<String> {
        let mut found: Vec<String> = references(module, text).into_iter().map(|(t, _)| t).collect();
        found.sort();
        found.dedup();
        found
    };
    assert_eq!(
        targets(
            "grpc::listener",
            "use crate::daemon::token_store::FD_NAME;\n// crate::x\n"
        ),
        ["daemon::token_store"]
    );
    assert_eq!(
        targets("token::endpoint", "use super::source::{Call, Failure};"),
        ["token::source"]
    );
    // `super::super`, from a file and from an inline module.
    assert_eq!(targets("a::b::c", "use super::super::x::Y;"), ["a::x"]);
    assert_eq!(targets("a::b", "mod tests { use super::super::z::f; }"), ["a::z::f"]);
    // Grouped and nested imports, `self` in a group.
    assert_eq!(
        targets(
            "m",
            "use crate::{grpc::{self, pb::Token}, proxy, token::source::Snapshot};"
        ),
        ["grpc", "grpc::pb", "proxy", "token::source"]
    );
    // Re-exports are dependencies too.
    assert_eq!(
        targets("m", "pub use crate::serve::listen::resolve_group;"),
        ["serve::listen::resolve_group"]
    );
    // Test modules count like any other code.
    assert_eq!(
        targets("m", "fn f() {}\n#[cfg(test)]\nmod tests { use crate::daemon::Broker; }"),
        ["daemon"]
    );
    // Paths in code, in types and in macros; children by their own name.
    assert_eq!(
        targets(
            "token",
            "mod source;\npub use source::Snapshot;\nfn f(x: crate::wire::pb::Token) { let t = source::start(c); \
             tracing::info!(a = %crate::fingerprint::token_id(&x)); }"
        ),
        [
            "fingerprint::token_id",
            "token::source",
            "token::source::start",
            "wire::pb"
        ]
    );
    // Other crates are not ours.
    assert!(targets("m", "use tokio::sync::watch; use std::io;").is_empty());
}

/// A circle closed through a grouped import, or through a test module, is
/// found; the same files without the closing arrow have none.
#[test]
fn a_circle_through_a_grouped_import_is_found() {
    let files = |b: &str| {
        vec![
            ("a".to_owned(), "use crate::{b::f, c};".to_owned()),
            ("b".to_owned(), b.to_owned()),
            ("c".to_owned(), String::new()),
        ]
    };
    assert_eq!(
        circle(&file_arrows(&files("use crate::{a::g, c};"))),
        Some(vec!["a".to_owned(), "b".to_owned(), "a".to_owned()])
    );
    assert!(
        circle(&file_arrows(&files(
            "#[cfg(test)] mod tests { use super::super::a::g; }"
        )))
        .is_some()
    );
    assert_eq!(circle(&file_arrows(&files("use crate::c;"))), None);
}
