//! `cargo xtask lint`: the layering rules that the compiler does not check.
//!
//! - **No module cycles inside a crate.** Each `src/*.rs` file of a crate is a module; a file
//!   that names `crate::other` (in a `use` line or a path, outside comments and
//!   `#[cfg(test)]` code) depends on `other`. The dependencies must form no cycle: a module
//!   can be read after the ones it uses. (Crates cannot form cycles: cargo refuses them.)
//!
//! CI runs it as a test of xtask (`the_workspace_has_no_module_cycles`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const USAGE: &str = "usage: cargo xtask lint\n\nChecks the layering the compiler does not: inside each crate, the modules (src/*.rs files) that name each other with `crate::…` (use lines and paths, outside comments and #[cfg(test)] code) must form no cycle. Prints each crate's module order, or the cycle found (exit 1).";

/// module -> the modules of the same crate it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module graph of the crate whose `src/` is `src`.
pub fn crate_graph(src: &Path) -> Result<Graph> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    let modules: BTreeSet<String> = files.iter().filter_map(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()).filter(|m| m != "lib" && m != "main").collect();
    let mut graph = Graph::new();
    for path in &files {
        let module = path.file_stem().expect("a file").to_string_lossy().into_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(path)?;
        let used = named_modules(&text).into_iter().filter(|m| m != &module && modules.contains(m)).collect();
        graph.insert(module, used);
    }
    Ok(graph)
}

/// The modules `text` names as `crate::m` (also inside `use crate::{a, b::c}`), outside
/// comments and the `#[cfg(test)]` part of the file.
pub fn named_modules(text: &str) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or("")
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let boundary = i == 0 || !rest[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_');
        if boundary {
            if let Some(group) = after.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level item
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.extend(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        item.push(c);
                    }
                }
                out.extend(first_segment(&item));
            } else {
                out.extend(first_segment(after));
            }
        }
        rest = after;
    }
    out
}

fn first_segment(s: &str) -> Option<String> {
    let name: String = s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name.chars().next().is_some_and(|c| c.is_lowercase())).then_some(name)
}

/// A cycle of `graph` (its modules in order, the first repeated at the end), if it has one.
pub fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(m: &str, graph: &Graph, marks: &mut BTreeMap<String, Mark>, path: &mut Vec<String>) -> Option<Vec<String>> {
        match marks.get(m) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|p| p == m).expect("an open module is on the path");
                let mut cycle = path[start..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(m.to_string(), Mark::Open);
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(m.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in graph.keys() {
        if let Some(c) = visit(m, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// The module graphs of every crate of the workspace (`crates/*`, `xtask`), by crate name.
pub fn workspace_graphs(root: &Path) -> Result<BTreeMap<String, Graph>> {
    let mut out = BTreeMap::new();
    let mut dirs: Vec<_> = std::fs::read_dir(root.join("crates"))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.push(root.join("xtask"));
    for dir in dirs {
        let src = dir.join("src");
        if src.is_dir() {
            out.insert(dir.file_name().expect("a folder").to_string_lossy().into_owned(), crate_graph(&src)?);
        }
    }
    Ok(out)
}

/// `cargo xtask lint`.
pub fn lint(root: &Path) -> Result<()> {
    let mut failed = Vec::new();
    for (krate, graph) in workspace_graphs(root)? {
        match find_cycle(&graph) {
            Some(cycle) => failed.push(format!("{krate}: modules import each other: {}", cycle.join(" -> "))),
            None => println!("lint: {krate}: {} modules, no cycle", graph.len()),
        }
    }
    if !failed.is_empty() {
        bail!("{}\n(move what both need into a module of its own, which both import)", failed.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_lines_and_paths_name_modules_and_comments_and_tests_do_not() {
        let text = "use crate::error::{Result, TorchError};\nuse crate::{module::HookedModule, padding};\n// crate::commented\nfn f() { crate::site::x(); let y = hook_crate::other; }\n#[cfg(test)]\nmod tests { use crate::testonly; }\n";
        let got: Vec<String> = named_modules(text).into_iter().collect();
        assert_eq!(got, vec!["error", "module", "padding", "site"]);
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        let mut g = Graph::new();
        g.insert("a".into(), ["b".to_string()].into());
        g.insert("b".into(), ["c".to_string()].into());
        g.insert("c".into(), ["a".to_string()].into());
        assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
        g.insert("c".into(), BTreeSet::new());
        assert_eq!(find_cycle(&g), None);
    }

    #[test]
    fn the_workspace_has_no_module_cycles() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace");
        let graphs = workspace_graphs(root).unwrap();
        assert!(graphs.len() >= 9, "{:?}", graphs.keys());
        assert!(graphs["hook-torch"].len() >= 10);
        let cycles: Vec<String> = graphs.iter().filter_map(|(k, g)| find_cycle(g).map(|c| format!("{k}: {}", c.join(" -> ")))).collect();
        assert!(cycles.is_empty(), "module cycles: {cycles:#?}");
    }
}
