//! Reads a crate's sources and builds the graph of references between its top-level modules,
//! to prove that no two of them import each other, directly or around a loop.
//!
//! A top-level module is a `mod x;` (or inline `mod x { .. }`) in `lib.rs`; its code is
//! `src/x.rs`, `src/x/mod.rs` and every file under `src/x/`. An edge `a → b` is any path in
//! `a`'s code that names `crate::b` — in `use` trees (`use crate::{b::T, c}` names `b` and `c`)
//! and in expressions, types and macro bodies alike — or reaches `b` through `super::`
//! from a depth that climbs to the crate root (`super::b` in `src/a.rs`, `super::super::b` in
//! `src/a/x.rs`). Comments, doc links and string literals are not code and do not count;
//! neither do items under `#[cfg(test)]` (a unit test may build whatever it needs) nor names
//! of items defined in `lib.rs` itself (`crate::AppState`: the root is above every module).
//!
//! The sources are lexed with `proc-macro2`, so strings, raw strings, char literals and
//! lifetimes never confuse the scan.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr as _;

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

/// Where a reference from one top-level module to another was seen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    /// The file, relative to `src/`.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
}

/// The top-level modules of one crate and the references between them.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    modules: BTreeSet<String>,
    /// `from → to → the first place `from` names `to``.
    edges: BTreeMap<String, BTreeMap<String, Site>>,
}

/// A group of modules that reach each other (a strongly connected component), with one
/// loop through it: modules in order, the first repeated at the end, and where each step is
/// made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    pub members: Vec<String>,
    pub path: Vec<String>,
    pub sites: Vec<Site>,
}

impl std::fmt::Display for Cycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.join(" → "))?;
        if self.members.len() + 1 > self.path.len() {
            write!(
                f,
                " (one loop of a cycle among {})",
                self.members.join(", ")
            )?;
        }
        for (step, site) in self.path.windows(2).zip(&self.sites) {
            write!(
                f,
                "\n      {} names {} at {}:{}",
                step[0],
                step[1],
                site.file.display(),
                site.line
            )?;
        }
        Ok(())
    }
}

impl ModuleGraph {
    /// Reads `src` (a crate's source directory with a `lib.rs`).
    pub fn from_crate(src: &Path) -> Result<Self, String> {
        let mut files = Vec::new();
        collect_rs(src, src, &mut files)?;
        Self::from_files(files)
    }

    /// Builds the graph from `(path relative to src/, text)` pairs; one must be `lib.rs`.
    pub fn from_files(files: Vec<(PathBuf, String)>) -> Result<Self, String> {
        let lib = files
            .iter()
            .find(|(path, _)| path == Path::new("lib.rs"))
            .ok_or("no lib.rs among the sources")?;
        let lib_tokens = lex(&lib.0, &lib.1)?;
        let mut graph = ModuleGraph::default();
        let mut inline = Vec::new();
        declared_modules(&lib_tokens, &mut graph.modules, &mut inline);
        // Inline top-level modules: their bodies are code of that module at depth 1.
        for (name, body) in inline {
            graph.scan(&name, Path::new("lib.rs"), body, 1);
        }
        for (path, text) in &files {
            let Some((module, depth)) = owner(path) else {
                continue;
            };
            if !graph.modules.contains(&module) {
                continue;
            }
            let tokens = lex(path, text)?;
            graph.scan(&module, path, tokens, depth);
        }
        Ok(graph)
    }

    /// The top-level modules found in `lib.rs`.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(String::as_str)
    }

    /// Whether `from` names `to` anywhere.
    pub fn has_edge(&self, from: &str, to: &str) -> bool {
        self.edges
            .get(from)
            .is_some_and(|to_map| to_map.contains_key(to))
    }

    fn scan(&mut self, module: &str, file: &Path, tokens: TokenStream, depth: usize) {
        let mut found = Vec::new();
        references(tokens, depth, &mut found);
        for (target, line) in found {
            if target != module && self.modules.contains(&target) {
                self.edges
                    .entry(module.to_owned())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| Site {
                        file: file.to_owned(),
                        line,
                    });
            }
        }
    }

    /// Every cycle, one per strongly connected group of modules (the shortest loop through the
    /// group's first module, by name), in name order. Empty when the graph is acyclic.
    pub fn cycles(&self) -> Vec<Cycle> {
        strongly_connected(&self.modules, &self.edges)
            .into_iter()
            .filter(|group| group.len() > 1)
            .filter_map(|group| self.shortest_loop(&group))
            .collect()
    }

    /// Breadth-first from the group's first member back to it, inside the group.
    fn shortest_loop(&self, group: &BTreeSet<String>) -> Option<Cycle> {
        let start = group.iter().next()?;
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([start.as_str()]);
        while let Some(at) = queue.pop_front() {
            for next in self.edges.get(at).into_iter().flat_map(BTreeMap::keys) {
                if !group.contains(next) {
                    continue;
                }
                if next == start {
                    let mut path = vec![start.clone()];
                    let mut cursor = at;
                    while cursor != start {
                        path.push(cursor.to_owned());
                        cursor = parent[cursor];
                    }
                    path.push(start.clone());
                    path.reverse();
                    let sites = path
                        .windows(2)
                        .map(|step| self.edges[&step[0]][&step[1]].clone())
                        .collect();
                    return Some(Cycle {
                        members: group.iter().cloned().collect(),
                        path,
                        sites,
                    });
                }
                if !parent.contains_key(next.as_str()) {
                    parent.insert(next, at);
                    queue.push_back(next);
                }
            }
        }
        None
    }
}

/// Every `.rs` file under `dir`, relative to `root`.
fn collect_rs(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_rs(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let relative = path.strip_prefix(root).unwrap_or(&path).to_owned();
            out.push((relative, text));
        }
    }
    Ok(())
}

fn lex(path: &Path, text: &str) -> Result<TokenStream, String> {
    TokenStream::from_str(text).map_err(|e| format!("{} does not lex: {e}", path.display()))
}

/// The top-level module a file belongs to and its module depth (`a.rs`, `a/mod.rs` → 1;
/// `a/b.rs`, `a/b/mod.rs` → 2; ...). `None` for the crate roots (`lib.rs`, `main.rs`).
fn owner(path: &Path) -> Option<(String, usize)> {
    let parts: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let (file, dirs) = parts.split_last()?;
    let stem = file.strip_suffix(".rs")?;
    let top = match dirs.first() {
        Some(dir) => dir.clone(),
        None if stem == "lib" || stem == "main" => return None,
        None => stem.to_owned(),
    };
    let depth = if stem == "mod" || dirs.is_empty() {
        dirs.len().max(1)
    } else {
        dirs.len() + 1
    };
    Some((top, depth))
}

/// The `mod x;` and `mod x { .. }` items of the crate root (those under `#[cfg(test)]` aside).
fn declared_modules(
    tokens: &TokenStream,
    names: &mut BTreeSet<String>,
    inline: &mut Vec<(String, TokenStream)>,
) {
    let mut code = Code::new(tokens.clone());
    while let Some(i) = code.next() {
        let tokens = &code.tokens;
        let (true, Some(TokenTree::Ident(name))) = (is_ident(&tokens[i], "mod"), tokens.get(i + 1))
        else {
            continue;
        };
        names.insert(name.to_string());
        let after = match tokens.get(i + 2) {
            Some(TokenTree::Group(body)) if body.delimiter() == Delimiter::Brace => {
                inline.push((name.to_string(), body.stream()));
                i + 3
            }
            _ => i + 2,
        };
        code.resume_at(after);
    }
}

/// The tokens of code in a token list: attributes, and items under `#[cfg(test)]`, skipped.
struct Code {
    tokens: Vec<TokenTree>,
    next: usize,
}

impl Code {
    fn new(stream: TokenStream) -> Self {
        Self {
            tokens: stream.into_iter().collect(),
            next: 0,
        }
    }

    /// The index of the next token of code.
    fn next(&mut self) -> Option<usize> {
        let mut test_only = false;
        while self.next < self.tokens.len() {
            if let Some(after) = attribute(&self.tokens, self.next) {
                test_only |= is_cfg_test(&self.tokens[self.next + 1]);
                self.next = after;
            } else if test_only {
                self.next = skip_item(&self.tokens, self.next);
                test_only = false;
            } else {
                self.next += 1;
                return Some(self.next - 1);
            }
        }
        None
    }

    /// Continues from `index` (after a construct the caller consumed whole).
    fn resume_at(&mut self, index: usize) {
        self.next = index;
    }
}

/// If `tokens[i]` starts an attribute (`#[..]` or `#![..]`), the index after it.
fn attribute(tokens: &[TokenTree], i: usize) -> Option<usize> {
    let TokenTree::Punct(hash) = &tokens[i] else {
        return None;
    };
    if hash.as_char() != '#' {
        return None;
    }
    let mut j = i + 1;
    if matches!(tokens.get(j), Some(TokenTree::Punct(p)) if p.as_char() == '!') {
        j += 1;
    }
    match tokens.get(j) {
        Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Bracket => Some(j + 1),
        _ => None,
    }
}

/// Whether an attribute's bracket group is `[cfg(test)]` (or `[cfg(all(test, ..))]`).
fn is_cfg_test(tree: &TokenTree) -> bool {
    let TokenTree::Group(group) = tree else {
        return false;
    };
    let inner: Vec<TokenTree> = group.stream().into_iter().collect();
    let [TokenTree::Ident(cfg), TokenTree::Group(args)] = inner.as_slice() else {
        return false;
    };
    if cfg != "cfg" {
        return false;
    }
    let args: Vec<TokenTree> = args.stream().into_iter().collect();
    match args.as_slice() {
        [TokenTree::Ident(test)] => test == "test",
        [TokenTree::Ident(all), TokenTree::Group(list)] if all == "all" => list
            .stream()
            .into_iter()
            .any(|t| matches!(&t, TokenTree::Ident(i) if i == "test")),
        _ => false,
    }
}

fn is_ident(tree: &TokenTree, name: &str) -> bool {
    matches!(tree, TokenTree::Ident(i) if i == name)
}

/// Whether `tokens[i..]` starts with `::`.
fn is_path_sep(tokens: &[TokenTree], i: usize) -> bool {
    matches!(
        (tokens.get(i), tokens.get(i + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
            if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
    )
}

/// The top-level module names `tokens` refers to (with their lines), for code at module depth
/// `depth` (1 = directly inside a top-level module).
fn references(tokens: TokenStream, depth: usize, out: &mut Vec<(String, usize)>) {
    let mut code = Code::new(tokens);
    while let Some(i) = code.next() {
        let tokens = &code.tokens;
        let after = match &tokens[i] {
            TokenTree::Ident(ident) if ident == "mod" => {
                match (tokens.get(i + 1), tokens.get(i + 2)) {
                    (Some(TokenTree::Ident(_)), Some(TokenTree::Group(body)))
                        if body.delimiter() == Delimiter::Brace =>
                    {
                        references(body.stream(), depth + 1, out);
                        Some(i + 3)
                    }
                    _ => None,
                }
            }
            TokenTree::Ident(ident) if ident == "crate" && is_path_sep(tokens, i + 1) => {
                // `$crate::` in a macro names the crate that defines the macro, not a module.
                let dollar =
                    i > 0 && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == '$');
                if !dollar {
                    first_segments(tokens, i + 3, out);
                }
                Some(i + 3)
            }
            TokenTree::Ident(ident) if ident == "super" && is_path_sep(tokens, i + 1) => {
                let mut climbs = 1;
                let mut j = i + 3;
                while tokens.get(j).is_some_and(|t| is_ident(t, "super"))
                    && is_path_sep(tokens, j + 1)
                {
                    climbs += 1;
                    j += 3;
                }
                // Climbing to the crate root: the next segment is a top-level module.
                if climbs == depth {
                    first_segments(tokens, j, out);
                }
                Some(j)
            }
            TokenTree::Group(group) => {
                references(group.stream(), depth, out);
                None
            }
            _ => None,
        };
        if let Some(after) = after {
            code.resume_at(after);
        }
    }
}

/// The first segment of the path at `tokens[i]`: one identifier, or each entry of a use-tree
/// group (`{a::X, b, self}` → `a`, `b`).
fn first_segments(tokens: &[TokenTree], i: usize, out: &mut Vec<(String, usize)>) {
    match tokens.get(i) {
        Some(TokenTree::Ident(name)) => out.push((name.to_string(), name.span().start().line)),
        Some(TokenTree::Group(group)) if group.delimiter() == Delimiter::Brace => {
            let entries: Vec<TokenTree> = group.stream().into_iter().collect();
            let mut at_entry_start = true;
            for tree in &entries {
                match tree {
                    TokenTree::Ident(name) if at_entry_start => {
                        out.push((name.to_string(), name.span().start().line));
                        at_entry_start = false;
                    }
                    TokenTree::Punct(p) if p.as_char() == ',' => at_entry_start = true,
                    _ => at_entry_start = false,
                }
            }
        }
        _ => {}
    }
}

/// The index after the item that starts at `tokens[i]`: a `use` runs to its `;`, anything
/// else to its first `;` or `{ .. }` body.
fn skip_item(tokens: &[TokenTree], i: usize) -> usize {
    // `use`, `pub use`, `pub(crate) use`: the keyword after the visibility.
    let mut k = i;
    if tokens.get(k).is_some_and(|t| is_ident(t, "pub")) {
        k += 1;
        if matches!(tokens.get(k), Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Parenthesis)
        {
            k += 1;
        }
    }
    let is_use = tokens.get(k).is_some_and(|t| is_ident(t, "use"));
    let mut j = i;
    while j < tokens.len() {
        match &tokens[j] {
            TokenTree::Punct(p) if p.as_char() == ';' => return j + 1,
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace && !is_use => return j + 1,
            _ => j += 1,
        }
    }
    j
}

/// Tarjan's strongly connected components, iteratively.
fn strongly_connected(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeMap<String, Site>>,
) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        on_stack: BTreeSet<&'a str>,
        stack: Vec<&'a str>,
        groups: Vec<BTreeSet<String>>,
    }
    let successors = |node: &str| -> Vec<&String> {
        edges
            .get(node)
            .map(|to| to.keys().filter(|t| nodes.contains(*t)).collect())
            .unwrap_or_default()
    };
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on_stack: BTreeSet::new(),
        stack: Vec::new(),
        groups: Vec::new(),
    };
    for root in nodes {
        if state.index.contains_key(root.as_str()) {
            continue;
        }
        // (node, next successor to visit)
        let mut work: Vec<(&str, usize)> = vec![(root, 0)];
        while let Some(&mut (node, ref mut next)) = work.last_mut() {
            if *next == 0 && !state.index.contains_key(node) {
                let n = state.index.len();
                state.index.insert(node, n);
                state.low.insert(node, n);
                state.stack.push(node);
                state.on_stack.insert(node);
            }
            let succ = successors(node);
            if let Some(child) = succ.get(*next) {
                *next += 1;
                let child = child.as_str();
                if !state.index.contains_key(child) {
                    work.push((child, 0));
                } else if state.on_stack.contains(child) {
                    let low = state.low[node].min(state.index[child]);
                    state.low.insert(node, low);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                let low = state.low[parent].min(state.low[node]);
                state.low.insert(parent, low);
            }
            if state.low[node] == state.index[node] {
                let mut group = BTreeSet::new();
                while let Some(member) = state.stack.pop() {
                    state.on_stack.remove(member);
                    group.insert(member.to_owned());
                    if member == node {
                        break;
                    }
                }
                state.groups.push(group);
            }
        }
    }
    state.groups.sort();
    state.groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> ModuleGraph {
        ModuleGraph::from_files(
            files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_loop_through_three_modules_is_found_and_named_with_its_sites() {
        let g = graph(&[
            (
                "lib.rs",
                "pub mod a; mod b; pub(crate) mod c; mod d;\npub struct Root;",
            ),
            (
                "a.rs",
                "use crate::b::Thing;\nfn f() -> crate::Root { todo!() }",
            ),
            // A use tree names every first segment; `self` is not a module.
            ("b/mod.rs", "mod inner;\nuse crate::{self as me, d::X};"),
            // Two levels down, `super::super` climbs to the root.
            ("b/inner.rs", "fn g() { super::super::c::h() }"),
            ("c.rs", "\n\nfn h() { let _ = crate::a::A; }"),
            ("d.rs", "pub struct X;"),
        ]);
        assert!(g.has_edge("b", "c"), "super::super from b/inner.rs");
        assert!(g.has_edge("b", "d"));
        assert!(!g.has_edge("a", "Root"), "lib.rs items are not modules");
        let cycles = g.cycles();
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].path, ["a", "b", "c", "a"]);
        assert_eq!(
            cycles[0].sites[2],
            Site {
                file: "c.rs".into(),
                line: 3
            }
        );
        let text = cycles[0].to_string();
        assert!(text.starts_with("a → b → c → a"), "{text}");
        assert!(text.contains("b names c at b/inner.rs:1"), "{text}");
    }

    #[test]
    fn comments_strings_tests_and_macro_crate_paths_do_not_count() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b;\n#[cfg(test)] mod testing;"),
            (
                "a.rs",
                r##"//! See [`crate::b`].
                /* crate::b::X */
                const S: &str = "crate::b::X";
                const R: &str = r#"super::b"#;
                macro_rules! m { () => { $crate::b::X } }
                pub(crate) fn f<'a>(_: &'a str) -> char { 'c' }
                #[cfg(test)]
                mod tests { use crate::b::X; }
                #[cfg(test)]
                use crate::b::{X, Y};
                "##,
            ),
            ("b.rs", "use crate::a::f;"),
            ("testing.rs", "use crate::b; use crate::a;"),
        ]);
        assert_eq!(g.modules().collect::<Vec<_>>(), ["a", "b"]);
        assert!(g.has_edge("b", "a"));
        assert!(!g.has_edge("a", "b"), "only non-code mentions of b");
        assert!(g.cycles().is_empty());
    }

    #[test]
    fn paths_inside_macro_bodies_and_inline_modules_count() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b; mod c { fn f() { super::a::g() } }"),
            // `super` in an inline module of a.rs stays inside a; `crate::` in a macro is code.
            (
                "a.rs",
                "mod inner { use super::g; }\nfn g() { tracing::info!(x = ?crate::b::Y); }",
            ),
            ("b.rs", "fn h() { super::c::f() }"),
        ]);
        assert!(g.has_edge("a", "b"));
        assert!(g.has_edge("b", "c"));
        assert!(g.has_edge("c", "a"), "inline module of lib.rs");
        assert_eq!(g.cycles()[0].path, ["a", "b", "c", "a"]);
    }

    #[test]
    fn two_separate_loops_are_two_cycles() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b; mod c; mod d;"),
            ("a.rs", "use crate::b;"),
            ("b.rs", "use crate::a;"),
            ("c.rs", "use crate::d; use crate::a;"),
            ("d.rs", "use crate::c;"),
        ]);
        let paths: Vec<Vec<String>> = g.cycles().into_iter().map(|c| c.path).collect();
        assert_eq!(paths, [vec!["a", "b", "a"], vec!["c", "d", "c"]]);
    }

    #[test]
    fn a_loop_shorter_than_its_group_names_the_whole_group() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b; mod c;"),
            ("a.rs", "use crate::b;"),
            ("b.rs", "use crate::a; use crate::c;"),
            ("c.rs", "use crate::b;"),
        ]);
        let cycles = g.cycles();
        assert_eq!(cycles.len(), 1);
        assert_eq!(cycles[0].path, ["a", "b", "a"]);
        assert_eq!(cycles[0].members, ["a", "b", "c"]);
        assert!(
            cycles[0].to_string().contains("cycle among a, b, c"),
            "{}",
            cycles[0]
        );
    }

    #[test]
    fn file_owners_and_depths() {
        for (path, want) in [
            ("lib.rs", None),
            ("main.rs", None),
            ("a.rs", Some(("a", 1))),
            ("a/mod.rs", Some(("a", 1))),
            ("a/b.rs", Some(("a", 2))),
            ("a/b/mod.rs", Some(("a", 2))),
            ("a/b/c.rs", Some(("a", 3))),
        ] {
            assert_eq!(
                owner(Path::new(path)),
                want.map(|(m, d)| (m.to_owned(), d)),
                "{path}"
            );
        }
    }
}
