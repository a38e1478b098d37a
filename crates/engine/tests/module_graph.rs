//! The engine's modules form no import circle: every `crate::` (and `super::`) path in a
//! module's code is an edge to the module it names, and the graph of those edges must be
//! acyclic. Unit tests (`#[cfg(test)] mod tests`) and comments are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path such as `incoming::load`; the crate root is the empty string.
type Module = String;

/// An edge with where it was seen, for the failure message.
#[derive(Debug, Clone)]
struct Use {
    to: Module,
    file: PathBuf,
    line: usize,
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code a module contributes: without its unit-test module and whole-line comments.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// Expands the use-tree that starts at `s` (after `crate::` or `super::`) into full
/// paths: `a::{b, c::d}` gives `a::b` and `a::c::d`.
fn expand(s: &str) -> Vec<Vec<String>> {
    fn tree(chars: &[char], i: &mut usize) -> Vec<Vec<String>> {
        let mut prefix = Vec::new();
        loop {
            while *i < chars.len() && chars[*i].is_whitespace() {
                *i += 1;
            }
            if *i < chars.len() && chars[*i] == '{' {
                *i += 1;
                let mut out = Vec::new();
                loop {
                    while *i < chars.len() && (chars[*i].is_whitespace() || chars[*i] == ',') {
                        *i += 1;
                    }
                    if *i >= chars.len() || chars[*i] == '}' {
                        *i += 1;
                        break;
                    }
                    for rest in tree(chars, i) {
                        let mut p = prefix.clone();
                        p.extend(rest);
                        out.push(p);
                    }
                }
                return out;
            }
            let start = *i;
            while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
                *i += 1;
            }
            if start == *i {
                return vec![prefix];
            }
            prefix.push(chars[start..*i].iter().collect());
            if chars.get(*i) == Some(&':') && chars.get(*i + 1) == Some(&':') {
                *i += 2;
            } else {
                // ` as name`, `;`, `(`, ... end the path.
                return vec![prefix];
            }
        }
    }
    let chars: Vec<char> = s.chars().collect();
    tree(&chars, &mut 0)
}

fn parent(m: &str) -> Module {
    m.rsplit_once("::")
        .map_or(String::new(), |(p, _)| p.to_string())
}

/// The longest prefix of `path` that names a module.
fn resolve(modules: &BTreeSet<Module>, path: &[String]) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn edges(src: &Path) -> BTreeMap<Module, Vec<Use>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph: BTreeMap<Module, Vec<Use>> = BTreeMap::new();
    for file in &files {
        let from = module_of(src, file);
        let is_dir_module = file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let text = std::fs::read_to_string(file).expect("read module");
        // Statements may span lines: join the code, remembering where each line starts.
        let lines = code_lines(&text);
        let mut joined = String::new();
        let mut starts = Vec::new();
        for (n, l) in &lines {
            starts.push((joined.len(), *n));
            joined.push_str(l);
            joined.push('\n');
        }
        let line_at = |pos: usize| match starts.binary_search_by_key(&pos, |(p, _)| *p) {
            Ok(i) => starts[i].1,
            Err(i) => starts[i.saturating_sub(1)].1,
        };
        let mut found = Vec::new();
        for (kw, base) in [("crate::", String::new()), ("super::", parent(&from))] {
            let mut at = 0;
            while let Some(pos) = joined[at..].find(kw) {
                let abs = at + pos;
                at = abs + kw.len();
                let before = joined[..abs].chars().last();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                for path in expand(&joined[at..]) {
                    let mut full: Vec<String> = if base.is_empty() {
                        Vec::new()
                    } else {
                        base.split("::").map(str::to_string).collect()
                    };
                    full.extend(path);
                    if let Some(to) = resolve(&modules, &full) {
                        found.push((to, line_at(abs)));
                    }
                }
            }
        }
        // A directory module's `use child::...` (re-exports) depends on that child.
        if is_dir_module {
            for (n, l) in &lines {
                let t = l.trim_start();
                let rest = t
                    .strip_prefix("pub use ")
                    .or_else(|| t.strip_prefix("pub(crate) use "))
                    .or_else(|| t.strip_prefix("use "));
                if let Some(rest) = rest {
                    for path in expand(rest) {
                        let mut full: Vec<String> = if from.is_empty() {
                            Vec::new()
                        } else {
                            from.split("::").map(str::to_string).collect()
                        };
                        full.extend(path);
                        if let Some(to) = resolve(&modules, &full) {
                            found.push((to, *n));
                        }
                    }
                }
            }
        }
        found.sort();
        found.dedup();
        for (to, line) in found {
            if to != from && !to.is_empty() {
                graph.entry(from.clone()).or_default().push(Use {
                    to,
                    file: file.clone(),
                    line,
                });
            }
        }
        graph.entry(from).or_default();
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(graph: &BTreeMap<Module, Vec<Use>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<Module, Vec<Use>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            let graph = self.graph;
            for u in graph.get(v).into_iter().flatten() {
                let w = u.to.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().expect("on stack");
                    self.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.out
}

#[test]
fn engine_modules_form_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = edges(&src);
    assert!(graph.len() > 20, "found only {} modules", graph.len());
    let found = circles(&graph);
    let mut report = String::new();
    for scc in &found {
        report.push_str(&format!("circle: {}\n", scc.join(" ↔ ")));
        for m in scc {
            for u in &graph[m] {
                if scc.contains(&u.to) {
                    report.push_str(&format!(
                        "  {m} → {} ({}:{})\n",
                        u.to,
                        u.file.display(),
                        u.line
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "import circles between engine modules:\n{report}"
    );
}

#[test]
fn the_checker_sees_a_circle() {
    let dir = std::env::temp_dir().join(format!("vmigrate-modgraph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("side")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod a;\npub mod side;\n").unwrap();
    std::fs::write(
        dir.join("a.rs"),
        "use crate::side::{b::{Thing, Other as O}};\n// crate::c is a comment\n",
    )
    .unwrap();
    std::fs::write(dir.join("side/mod.rs"), "pub mod b;\npub use b::Thing;\n").unwrap();
    std::fs::write(
        dir.join("side/b.rs"),
        "fn f() { crate::a::g() }\n#[cfg(test)]\nmod tests { use crate::c::X; }\n",
    )
    .unwrap();
    std::fs::write(dir.join("c.rs"), "").unwrap();
    let graph = edges(&dir);
    let found = circles(&graph);
    assert_eq!(found, vec![vec!["a".to_string(), "side::b".to_string()]]);
    assert!(graph["side::b"].iter().all(|u| u.to != "c"));
    assert!(graph["a"].iter().all(|u| u.to != "c"));
    assert!(graph["side"].iter().any(|u| u.to == "side::b"));
    // A child that reaches back through its parent's re-export closes a circle too.
    std::fs::write(dir.join("side/b.rs"), "use super::Thing;\n").unwrap();
    let found = circles(&edges(&dir));
    assert_eq!(found, vec![vec!["side".to_string(), "side::b".to_string()]]);
    let _ = std::fs::remove_dir_all(&dir);
}
