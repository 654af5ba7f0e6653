//! The house keeps its shape (docs/architecture.md, "The map"): no import circle among the
//! files of `src/`, the engine names no transport, and every file is of a size one can read,
//! opening with `//!` lines that say what it owns.
//!
//! The imports are read as text: every `crate::…`, `super::…` and `self::…` path (in `use`
//! lines, brace groups expanded, and in code), and in a `mod.rs`/`lib.rs` the `use` lines that
//! name a child module, each resolved to the file of the longest module prefix it names. A
//! file's references to its own ancestors (`super::…` up the module tree that declares it) are
//! the tree itself, not imports, and are left out; so are the unit tests at the end of a file
//! (`#[cfg(test)]`: a test may reach any part to check this one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: src/engine/intake.rs -> ["engine", "intake"]; src/engine/mod.rs ->
/// ["engine"]; src/lib.rs -> [].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_string()),
    }
    parts
}

/// The code of a file without its comments (a doc comment names paths it does not import) and
/// without its unit tests (a test may reach any part to check this one).
fn code(text: &str) -> String {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands `a::{b, c::{d, e}}` (the text after a path's `::`) into `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let path = path.trim();
    let Some(open) = path.find('{') else {
        return vec![path.to_string()];
    };
    let prefix = &path[..open];
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| format!("{prefix}{p}"))
        .collect()
}

/// The paths a file's code names, as module-path segments from the crate root.
fn named_paths(module: &[String], is_mod_file: bool, code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    // `use` items, whole (they may span lines and hold brace groups)
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        for p in expand(&rest[..end].replace(char::is_whitespace, "")) {
            let p = p.split(" as ").next().unwrap_or("").to_string();
            paths.push(p);
        }
        rest = &rest[end..];
    }
    // paths in code
    for start in ["crate::", "super::", "self::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(start) {
            let i = at + i;
            at = i + start.len();
            if code[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            {
                continue;
            }
            let tail: String = code[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            paths.push(tail);
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let segs: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
            let first = *segs.first()?;
            let mut base: Vec<String> = match first {
                "crate" => Vec::new(),
                "self" => module.to_vec(),
                "super" => {
                    let mut m = module.to_vec();
                    m.pop();
                    m
                }
                // a child module named by a `use` in its parent's file
                _ if is_mod_file => {
                    let mut m = module.to_vec();
                    m.push(first.to_string());
                    return Some(
                        m.into_iter()
                            .chain(segs[1..].iter().map(|s| s.to_string()))
                            .collect(),
                    );
                }
                _ => return None,
            };
            let mut tail = &segs[1..];
            while tail.first() == Some(&"super") {
                base.pop();
                tail = &tail[1..];
            }
            base.extend(tail.iter().map(|s| s.to_string()));
            Some(base)
        })
        .collect()
}

/// The import graph of src/: file -> files it imports.
fn graph() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.retain(|f| !f.ends_with("main.rs"));
    let by_module: BTreeMap<Vec<String>, PathBuf> =
        files.iter().map(|f| (module_of(f), f.clone())).collect();
    let mut g = BTreeMap::new();
    for f in &files {
        let module = module_of(f);
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let is_mod_file = name == "mod.rs" || name == "lib.rs";
        let text = code(&std::fs::read_to_string(f).unwrap());
        let mut deps = BTreeSet::new();
        for path in named_paths(&module, is_mod_file, &text) {
            // the longest prefix that is a module of src/
            let target = (0..=path.len())
                .rev()
                .find_map(|n| by_module.get(&path[..n]));
            let Some(target) = target else { continue };
            let tmod = module_of(target);
            // itself, or an ancestor that declares it: the module tree, not an import
            if target == f || module.starts_with(&tmod) {
                continue;
            }
            deps.insert(target.clone());
        }
        g.insert(f.clone(), deps);
    }
    g
}

/// The strongly connected components of more than one file (Tarjan).
fn circles(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct T<'a> {
        g: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        n: usize,
        out: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a PathBuf) {
        t.index.insert(v, t.n);
        t.low.insert(v, t.n);
        t.n += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        n: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_reader_of_imports_sees_what_it_should() {
    assert_eq!(
        expand("crate::domain::{Event, job::{self, EventView}}"),
        vec![
            "crate::domain::Event",
            "crate::domain::job::self",
            "crate::domain::job::EventView"
        ]
    );
    let g = graph();
    let file = |p: &str| src().join(p);
    let deps = &g[&file("engine/intake.rs")];
    assert!(deps.contains(&file("domain/origin.rs")), "{deps:?}");
    assert!(deps.contains(&file("engine/store.rs")), "{deps:?}");
    assert!(
        !deps.contains(&file("engine/mod.rs")),
        "its parent is the tree"
    );
    // a circle made up on purpose is found
    let mut bad = g.clone();
    bad.get_mut(&file("domain/origin.rs"))
        .unwrap()
        .insert(file("engine/intake.rs"));
    assert!(!circles(&bad).is_empty());
}

#[test]
fn no_import_circle_among_the_files_of_src() {
    let found = circles(&graph());
    assert!(found.is_empty(), "import circles: {found:#?}");
}

#[test]
fn the_engine_names_no_transport() {
    let mut files = Vec::new();
    rust_files(&src().join("engine"), &mut files);
    for f in files {
        let text = code(&std::fs::read_to_string(&f).unwrap()).to_lowercase();
        for word in [
            "amqp",
            "edges::",
            ".amqp-",
            "active/",
            "outbox/",
            "incoming/",
        ] {
            assert!(
                !text.contains(word),
                "{} names {word:?}: the engine knows no transport",
                f.display()
            );
        }
    }
}

#[test]
fn every_file_is_readable_and_says_what_it_owns() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} does not open with //! lines",
            f.display()
        );
        let before_tests = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .count();
        assert!(
            before_tests <= 720,
            "{}: {before_tests} lines before its tests",
            f.display()
        );
    }
}
