//! The layering check of docs/ARCHITECTURE.md: every module of `src/` imports only from its
//! own layer or the layers below, and no two modules (files) or top-level folders import each
//! other, directly or around a circle.
//!
//! Layers, top to bottom: `cli` -> `jobs` -> `train`, `eval`, `analyze` -> `data`, `methods`,
//! `model` -> `ops`, `io` -> `util`. The check reads the source text: every `crate::` and
//! `super::` path, in `use` declarations (braces expanded) and inline, resolved to the file
//! that defines the module it names. `mod` declarations are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of a top-level module (higher = above).
fn layer_of(top: &str) -> Option<usize> {
    Some(match top {
        "util" => 0,
        "ops" | "io" => 1,
        "data" | "methods" | "model" => 2,
        "train" | "eval" | "analyze" => 3,
        "jobs" => 4,
        "cli" => 5,
        _ => return None,
    })
}

/// A module path as its components (`["model", "llama"]`); the crate root is empty.
type ModPath = Vec<String>;

fn module_path(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" && stem != "lib" {
        parts.push(stem);
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("readable src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The text without comments and string literals (so that paths in docs do not count).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // raw string r"..." or r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(b[i] as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            i = j + close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // a char literal ('x', '\n') or a lifetime ('a)
            let lit = b.get(i + 2) == Some(&b'\'')
                || (b.get(i + 1) == Some(&b'\\')
                    && b[i + 2..].iter().take(10).any(|&c| c == b'\''));
            if lit {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into its paths.
fn expand_use(tree: &str) -> Vec<String> {
    // `x as y` keeps only the path
    let tree: String = tree
        .replace(" as ", "@")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    fn go(prefix: &str, t: &str, out: &mut Vec<String>) {
        if let Some(open) = t.find('{') {
            let head = &t[..open];
            let inner = &t[open + 1..t.rfind('}').unwrap_or(t.len())];
            let mut depth = 0;
            let mut start = 0;
            let chars: Vec<char> = inner.chars().collect();
            let mut parts = Vec::new();
            for (k, &c) in chars.iter().enumerate() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parts.push(chars[start..k].iter().collect::<String>());
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            parts.push(chars[start..].iter().collect::<String>());
            for p in parts.into_iter().filter(|p| !p.is_empty()) {
                go(&format!("{prefix}{head}"), &p, out);
            }
        } else {
            let t = t.split('@').next().unwrap_or(t);
            out.push(format!("{prefix}{t}"));
        }
    }
    let mut out = Vec::new();
    go("", &tree, &mut out);
    out
}

/// Every `crate::…` / `super::…` path of a file's code.
fn referenced_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    // use declarations, braces expanded
    let mut rest = code;
    while let Some(k) = rest.find("use ") {
        let before_ok = k == 0 || !is_ident(rest[..k].chars().last().unwrap_or(' '));
        let after = &rest[k + 4..];
        if before_ok && let Some(end) = after.find(';') {
            let tree = after[..end].trim();
            if tree.starts_with("crate::") || tree.starts_with("super::") {
                paths.extend(expand_use(tree));
            }
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    // inline paths
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(root) {
            let at = from + k;
            let before_ok = at == 0 || !is_ident(code[..at].chars().last().unwrap_or(' '));
            let mut end = at;
            let bytes = code.as_bytes();
            while end < code.len()
                && (is_ident(bytes[end] as char) || code[end..].starts_with("::"))
            {
                end += if code[end..].starts_with("::") { 2 } else { 1 };
            }
            // `a::{b, c}` groups are use trees, expanded above
            let group = code[end..].starts_with('{');
            if before_ok && !group {
                paths.push(code[at..end].trim_end_matches("::").to_string());
            }
            from = end.max(at + root.len());
        }
    }
    paths
}

/// The module a path names: the longest prefix that is a module of the crate.
fn resolve(from: &ModPath, path: &str, modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    let mut base: ModPath = Vec::new();
    let mut i = 0;
    match parts.first() {
        Some(&"crate") => i = 1,
        Some(&"super") => {
            base = from.clone();
            while parts.get(i) == Some(&"super") {
                base.pop();
                i += 1;
            }
        }
        _ => return None,
    }
    // the module that holds the item: the longest prefix of the path that is a file module
    // (an inline module's items belong to its file)
    let mut full = base.clone();
    full.extend(parts[i..].iter().map(|p| p.to_string()));
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|p| modules.contains(p))
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Strongly connected components with more than one member (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit(t: &mut T, v: &str) {
        t.index.insert(v.into(), t.next);
        t.low.insert(v.into(), t.next);
        t.next += 1;
        t.stack.push(v.into());
        t.on.insert(v.into());
        let succ: Vec<String> = t
            .edges
            .get(v)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for w in succ {
            if !t.index.contains_key(&w) {
                visit(t, &w);
                let l = t.low[v].min(t.low[&w]);
                t.low.insert(v.into(), l);
            } else if t.on.contains(&w) {
                let l = t.low[v].min(t.index[&w]);
                t.low.insert(v.into(), l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on.remove(&w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on: BTreeSet::new(),
        next: 0,
        out: vec![],
    };
    let nodes: Vec<String> = edges.keys().cloned().collect();
    for v in nodes {
        if !t.index.contains_key(&v) {
            visit(&mut t, &v);
        }
    }
    t.out
}

/// The names of the modules a piece of code declares (`mod x;` or `mod x { .. }`).
fn declared_modules(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(k) = rest.find("mod ") {
        let before_ok = k == 0 || !is_ident(rest[..k].chars().last().unwrap_or(' '));
        let after = &rest[k + 4..];
        let name: String = after.chars().take_while(|&c| is_ident(c)).collect();
        let tail = after[name.len()..].trim_start();
        if before_ok && !name.is_empty() && (tail.starts_with(';') || tail.starts_with('{')) {
            names.push(name.clone());
        }
        rest = &after[name.len()..];
    }
    names
}

/// Splits inline modules (`mod tests { .. }`) out of `code`: the code outside them, and
/// each one's name and body (a body's `super::` is the enclosing module).
fn inline_modules(code: &str) -> (String, Vec<(String, String)>) {
    let mut outside = String::new();
    let mut inner = Vec::new();
    let mut rest = code;
    loop {
        let Some(k) = rest.find("mod ") else {
            outside.push_str(rest);
            break;
        };
        let before_ok = k == 0 || !is_ident(rest[..k].chars().last().unwrap_or(' '));
        let after = &rest[k + 4..];
        let name: String = after.chars().take_while(|&c| is_ident(c)).collect();
        let tail = &after[name.len()..];
        let brace = tail.len() - tail.trim_start().len();
        if !(before_ok && !name.is_empty() && tail.trim_start().starts_with('{')) {
            outside.push_str(&rest[..k + 4]);
            rest = after;
            continue;
        }
        outside.push_str(&rest[..k]);
        let body_start = k + 4 + name.len() + brace + 1;
        let mut depth = 1;
        let mut end = body_start;
        for (i, c) in rest[body_start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = body_start + i;
                break;
            }
        }
        inner.push((name, rest[body_start..end].to_string()));
        rest = &rest[(end + 1).min(rest.len())..];
    }
    (outside, inner)
}

/// The modules `code` (the code of module `m`) refers to: `crate::` and `super::` paths,
/// and paths that start with a module it declares (`use child::Item;`, `child::f()`).
fn code_edges(m: &ModPath, code: &str, modules: &BTreeSet<ModPath>, out: &mut BTreeSet<ModPath>) {
    let (outside, inner) = inline_modules(code);
    for (name, body) in inner {
        let mut sub = m.clone();
        sub.push(name);
        code_edges(&sub, &body, modules, out);
    }
    let mut paths = referenced_paths(&outside);
    for child in declared_modules(&outside) {
        let mut from = 0;
        let pat = format!("{child}::");
        while let Some(k) = outside[from..].find(&pat) {
            let at = from + k;
            let prev = outside[..at].chars().last().unwrap_or(' ');
            if !is_ident(prev) && prev != ':' {
                let end = outside[at..]
                    .find(|c: char| !(is_ident(c) || c == ':'))
                    .map(|e| at + e)
                    .unwrap_or(outside.len());
                paths.push(format!("self::{}", &outside[at..end]));
            }
            from = at + pat.len();
        }
    }
    for p in paths {
        let p = match p.strip_prefix("self::") {
            Some(rest) => format!(
                "{}::{rest}",
                m.iter().fold("crate".to_string(), |a, x| a + "::" + x)
            ),
            None => p,
        };
        if let Some(target) = resolve(m, &p, modules) {
            out.insert(target);
        }
    }
}

/// Import edges between modules (files) of `src/`, lib.rs and main.rs excluded. Code in an
/// inline module (`mod tests { .. }`) counts for its file.
fn module_edges(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_path(src, f)).collect();
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for f in &files {
        let m = module_path(src, f);
        if m.is_empty() || f.ends_with("main.rs") {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(f).expect("readable source"));
        let mut targets = BTreeSet::new();
        code_edges(&m, &code, &modules, &mut targets);
        // references into the file itself (its inline modules) and to the crate root are
        // not edges
        targets.retain(|t| !t.is_empty() && t != &m);
        edges.insert(m, targets);
    }
    edges
}

/// Every violation of the layering rules in the crate under `src`.
fn violations(src: &Path) -> Vec<String> {
    let edges = module_edges(src);
    let mut bad = Vec::new();
    for (from, tos) in &edges {
        let Some(lf) = layer_of(&from[0]) else {
            bad.push(format!(
                "{}: top-level module `{}` has no layer",
                name(from),
                from[0]
            ));
            continue;
        };
        for to in tos {
            match layer_of(&to[0]) {
                Some(lt) if lt > lf => bad.push(format!(
                    "{} imports {}, a layer above it",
                    name(from),
                    name(to)
                )),
                None => bad.push(format!(
                    "{} imports {}, which has no layer",
                    name(from),
                    name(to)
                )),
                _ => {}
            }
        }
    }
    let files: BTreeMap<String, BTreeSet<String>> = edges
        .iter()
        .map(|(k, v)| (name(k), v.iter().map(name).collect()))
        .collect();
    for c in circles(&files) {
        bad.push(format!("import circle between modules: {}", c.join(", ")));
    }
    let mut folders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &edges {
        let e = folders.entry(from[0].clone()).or_default();
        for to in tos.iter().filter(|t| t[0] != from[0]) {
            e.insert(to[0].clone());
        }
    }
    for c in circles(&folders) {
        bad.push(format!("import circle between folders: {}", c.join(", ")));
    }
    bad.sort();
    bad
}

#[test]
fn imports_point_down_and_never_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn the_check_sees_upward_imports_and_circles() {
    // a crate in a temporary folder that breaks every rule once
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for (path, text) in [
        (
            "lib.rs",
            "pub mod io; pub mod jobs; pub mod model; pub mod util;",
        ),
        // a folder's mod.rs and its child, each using the other; the child's inline test
        // module's `super::` is the child itself (no edge), its `super::super::` the folder
        (
            "jobs/mod.rs",
            "mod run; pub struct Config; pub fn go() { run::start(); }",
        ),
        (
            "jobs/run.rs",
            "use super::Config; pub fn start() {} mod tests { use super::start; }",
        ),
        ("util/mod.rs", "pub mod a; pub mod b;"),
        // a circle inside a layer, through a grouped use and an inline path
        ("util/a.rs", "use super::{b::{One, Two}};"),
        ("util/b.rs", "fn f() { crate::util::a::g(); }"),
        // an upward import hidden in a brace group
        ("io/mod.rs", "use crate::{model::config::Cfg, util::a};"),
        // paths in comments and strings do not count
        (
            "model/mod.rs",
            "pub mod config; // crate::io::x\nconst S: &str = \"crate::io\";",
        ),
        ("model/config.rs", "use crate::util::b as other;"),
    ] {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let bad = violations(&src);
    assert_eq!(
        bad,
        vec![
            "import circle between modules: jobs, jobs::run".to_string(),
            "import circle between modules: util::a, util::b".to_string(),
            "io imports model::config, a layer above it".to_string(),
        ],
        "{bad:#?}"
    );
}
