//! The import graph between the files of one crate, and its cycles.
//!
//! Two files that import each other are one idea split in two places, or a shared piece living
//! in one user's file: either way neither can be read, tested or moved alone. The workspace
//! test `import_cycles` runs [`crate_cycles`] on every crate and fails naming each cycle.
//!
//! The reading is lexical, not a compiler's: comments and literals are blanked, then the
//! module tree is walked from each crate root through `mod x;` declarations (honouring
//! `#[path]`), and every `use` tree and every path in code that starts with `crate::`,
//! `super::`, `self::` or a child module's name is resolved to the file that defines the longest
//! matching module prefix, following re-exports (`pub use`) to the defining file. Code under
//! `#[cfg(test)]` is left out: a test may reach anywhere. A module's own submodules are its
//! parts, so a parent declaring, re-exporting or calling them is not counted (else every
//! `mod.rs` that fronts its children and holds the types they share would be a cycle, which
//! is the ordinary layout); what is counted is a file reaching up or sideways.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One file's import of another, with the first path that made it (to point at the fix).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    /// The importing file.
    pub from: PathBuf,
    /// The imported file.
    pub to: PathBuf,
    /// The path as written (`crate::model::policy::Rule`).
    pub via: String,
}

/// A set of files each of which reaches every other through imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// The files, sorted.
    pub files: Vec<PathBuf>,
    /// The imports among them.
    pub edges: Vec<Edge>,
}

impl std::fmt::Display for Cycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.files.iter().map(|p| p.display().to_string()).collect();
        write!(f, "{}", names.join(" <-> "))?;
        for e in &self.edges {
            write!(
                f,
                "\n    {} imports {} ({})",
                e.from.display(),
                e.to.display(),
                e.via
            )?;
        }
        Ok(())
    }
}

/// The cycles between files of the crate whose manifest directory is `dir`, from each of its
/// roots (`src/lib.rs`, `src/main.rs`, `src/bin/*.rs`). Paths in the result are relative to
/// `dir`. An unreadable file is an error naming it.
pub fn crate_cycles(dir: &Path) -> std::io::Result<Vec<Cycle>> {
    let src = dir.join("src");
    let mut roots = Vec::new();
    for name in ["lib.rs", "main.rs"] {
        if src.join(name).is_file() {
            roots.push(src.join(name));
        }
    }
    if let Ok(entries) = std::fs::read_dir(src.join("bin")) {
        let mut bins: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    let mut edges = BTreeSet::new();
    for root in roots {
        edges.extend(root_edges(&root)?);
    }
    let edges: Vec<Edge> = edges
        .into_iter()
        .map(|e| Edge {
            from: e.from.strip_prefix(dir).unwrap_or(&e.from).to_path_buf(),
            to: e.to.strip_prefix(dir).unwrap_or(&e.to).to_path_buf(),
            via: e.via,
        })
        .collect();
    Ok(cycles(&edges))
}

/// The strongly connected components of more than one file (Tarjan's algorithm).
pub fn cycles(edges: &[Edge]) -> Vec<Cycle> {
    let mut nodes: BTreeSet<&PathBuf> = BTreeSet::new();
    let mut out: BTreeMap<&PathBuf, Vec<&PathBuf>> = BTreeMap::new();
    for e in edges {
        nodes.insert(&e.from);
        nodes.insert(&e.to);
        out.entry(&e.from).or_default().push(&e.to);
    }
    let index_of: BTreeMap<&PathBuf, usize> =
        nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let nodes: Vec<&PathBuf> = nodes.into_iter().collect();
    let adjacency: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            out.get(n)
                .map(|v| v.iter().map(|t| index_of[t]).collect())
                .unwrap_or_default()
        })
        .collect();
    let components = tarjan(&adjacency);
    let mut result = Vec::new();
    for component in components.into_iter().filter(|c| c.len() > 1) {
        let members: BTreeSet<&PathBuf> = component.iter().map(|&i| nodes[i]).collect();
        let edges = edges
            .iter()
            .filter(|e| members.contains(&e.from) && members.contains(&e.to))
            .cloned()
            .collect();
        result.push(Cycle {
            files: members.into_iter().cloned().collect(),
            edges,
        });
    }
    result.sort_by(|a, b| a.files.cmp(&b.files));
    result
}

/// Tarjan's strongly connected components, iteratively (deep module trees stay off the stack).
fn tarjan(adjacency: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = adjacency.len();
    let (mut index, mut low, mut on_stack) = (vec![UNSEEN; n], vec![0; n], vec![false; n]);
    let (mut stack, mut components, mut next) = (Vec::new(), Vec::new(), 0);
    for start in 0..n {
        if index[start] != UNSEEN {
            continue;
        }
        // (node, next neighbour to look at)
        let mut work = vec![(start, 0)];
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            if *i == 0 && index[v] == UNSEEN {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = adjacency[v].get(*i) {
                *i += 1;
                if index[w] == UNSEEN {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                components.push(component);
            }
        }
    }
    components
}

/// A module of a crate: its path from the crate root and its file.
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Every import edge between the files reached from one crate root.
fn root_edges(root: &Path) -> std::io::Result<Vec<Edge>> {
    // Walk the module tree: (module path, file, whether the file is a directory owner).
    let mut modules: Vec<Module> = Vec::new();
    let mut parsed: Vec<(usize, Scan)> = Vec::new();
    let mut queue = vec![Module {
        path: Vec::new(),
        file: root.to_path_buf(),
    }];
    while let Some(module) = queue.pop() {
        let text = std::fs::read_to_string(&module.file).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: {e}", module.file.display()))
        })?;
        let scan = scan(&text);
        let dir = child_dir(&module.file, module.path.is_empty());
        for decl in &scan.mods {
            let file = match &decl.path_attr {
                Some(p) => module.file.parent().unwrap_or(Path::new("")).join(p),
                None => {
                    let flat = dir.join(format!("{}.rs", decl.name));
                    if flat.is_file() {
                        flat
                    } else {
                        dir.join(&decl.name).join("mod.rs")
                    }
                }
            };
            if !file.is_file() || decl.test {
                continue;
            }
            let mut path = module.path.clone();
            path.extend(decl.inline.iter().cloned());
            path.push(decl.name.clone());
            queue.push(Module { path, file });
        }
        parsed.push((modules.len(), scan));
        modules.push(module);
    }
    let by_path: BTreeMap<&[String], &Path> = modules
        .iter()
        .map(|m| (m.path.as_slice(), m.file.as_path()))
        .collect();
    let index_of: BTreeMap<&Path, usize> = parsed
        .iter()
        .map(|(i, _)| (modules[*i].file.as_path(), *i))
        .collect();
    let scans: BTreeMap<usize, &Scan> = parsed.iter().map(|(i, s)| (*i, s)).collect();
    let mut edges = Vec::new();
    for (i, scan) in &parsed {
        let module = &modules[*i];
        for reference in &scan.paths {
            let mut context = module.path.clone();
            context.extend(reference.inline.iter().cloned());
            let Some(mut absolute) = resolve(&context, &reference.segments, &by_path) else {
                continue;
            };
            // Follow re-exports (`pub use server::Server;` in a facade) to the defining file.
            let mut target = None;
            for _ in 0..8 {
                let Some((n, file)) = longest_module(&absolute, &by_path) else {
                    break;
                };
                target = Some((absolute[..n].to_vec(), file));
                let (Some(item), Some(owner)) = (absolute.get(n), index_of.get(file)) else {
                    break;
                };
                let owner_scan = scans[owner];
                let Some(export) = owner_scan
                    .paths
                    .iter()
                    .find(|r| r.binds.as_deref() == Some(item.as_str()))
                else {
                    break;
                };
                let mut owner_context = modules[*owner].path.clone();
                owner_context.extend(export.inline.iter().cloned());
                match resolve(&owner_context, &export.segments, &by_path) {
                    Some(next) => absolute = [next.as_slice(), &absolute[n + 1..]].concat(),
                    // Another crate's item, re-exported: the facade is what this file uses.
                    None => break,
                }
            }
            if let Some((to_path, to)) = target {
                // A module's submodules are its parts: declaring, re-exporting or calling
                // them goes down the tree and is not an import that can close a loop.
                let descendant =
                    to_path.len() > module.path.len() && to_path.starts_with(&module.path);
                if to != module.file && !descendant {
                    edges.push(Edge {
                        from: module.file.clone(),
                        to: to.to_path_buf(),
                        via: reference.segments.join("::"),
                    });
                }
            }
        }
    }
    Ok(edges)
}

/// The longest prefix of `path` that is a module with a file: its length and the file.
fn longest_module<'a>(
    path: &[String],
    modules: &BTreeMap<&[String], &'a Path>,
) -> Option<(usize, &'a Path)> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n]).map(|f| (n, *f)))
}

/// Where the children of a module's file live: beside `lib.rs`/`main.rs`/`mod.rs`, in a
/// directory named after the file otherwise.
fn child_dir(file: &Path, is_root: bool) -> PathBuf {
    let parent = file.parent().unwrap_or(Path::new("")).to_path_buf();
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if is_root || stem == "mod" {
        parent
    } else {
        parent.join(stem)
    }
}

/// The absolute module path a reference names, or `None` for another crate's.
fn resolve(
    context: &[String],
    segments: &[String],
    modules: &BTreeMap<&[String], &Path>,
) -> Option<Vec<String>> {
    let first = segments.first()?;
    match first.as_str() {
        "crate" => Some(segments[1..].to_vec()),
        "self" => Some([context, &segments[1..]].concat()),
        "super" => {
            let ups = segments.iter().take_while(|s| *s == "super").count();
            let base = context.get(..context.len().checked_sub(ups)?)?;
            Some([base, &segments[ups..]].concat())
        }
        _ => {
            // A child module named without `self::` (2018 paths).
            let candidate = [context, &segments[..1]].concat();
            modules
                .contains_key(candidate.as_slice())
                .then(|| [context, segments].concat())
        }
    }
}

/// A `mod name;` declaration.
#[derive(Debug)]
struct ModDecl {
    name: String,
    /// Inline modules it sits in.
    inline: Vec<String>,
    path_attr: Option<String>,
    test: bool,
}

/// A path found in a `use` tree or in code, with the inline modules around it.
#[derive(Debug)]
struct Reference {
    segments: Vec<String>,
    inline: Vec<String>,
    /// For a `use`, the name it brings into scope (`None` for a glob or a path in code).
    binds: Option<String>,
}

#[derive(Debug, Default)]
struct Scan {
    mods: Vec<ModDecl>,
    paths: Vec<Reference>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
    /// A string literal's contents (kept for `#[path = "..."]`).
    Str(String),
}

/// The declarations and references of one file.
fn scan(text: &str) -> Scan {
    let tokens = tokenize(text);
    let mut scan = Scan::default();
    // Open braces: Some(name) for an inline module, with whether it is test-only.
    let mut braces: Vec<Option<(String, bool)>> = Vec::new();
    let mut pending_test = false;
    let mut pending_path: Option<String> = None;
    let mut i = 0;
    let in_test = |braces: &[Option<(String, bool)>]| braces.iter().flatten().any(|(_, t)| *t);
    let inline = |braces: &[Option<(String, bool)>]| -> Vec<String> {
        braces.iter().flatten().map(|(n, _)| n.clone()).collect()
    };
    while i < tokens.len() {
        match &tokens[i] {
            Token::Punct('#') => {
                let (attr, end) = attribute(&tokens, i);
                match attr {
                    Attr::CfgTest => pending_test = true,
                    Attr::Path(p) => pending_path = Some(p),
                    Attr::Other => {}
                }
                i = end;
                continue;
            }
            Token::Punct('{') => braces.push(None),
            Token::Punct('}') => {
                braces.pop();
            }
            Token::Ident(word) if word == "mod" => {
                if let Some(Token::Ident(name)) = tokens.get(i + 1) {
                    let test = pending_test || in_test(&braces);
                    match tokens.get(i + 2) {
                        Some(Token::Punct(';')) => scan.mods.push(ModDecl {
                            name: name.clone(),
                            inline: inline(&braces),
                            path_attr: pending_path.take(),
                            test,
                        }),
                        Some(Token::Punct('{')) => {
                            braces.push(Some((name.clone(), test)));
                            i += 3;
                            pending_test = false;
                            pending_path = None;
                            continue;
                        }
                        _ => {}
                    }
                    i += 2;
                }
                pending_test = false;
                pending_path = None;
            }
            Token::Ident(word) if word == "use" => {
                let end = (i..tokens.len())
                    .find(|&j| tokens[j] == Token::Punct(';'))
                    .unwrap_or(tokens.len());
                if !pending_test && !in_test(&braces) {
                    for (segments, binds) in use_tree(&tokens[i + 1..end]) {
                        scan.paths.push(Reference {
                            segments,
                            inline: inline(&braces),
                            binds,
                        });
                    }
                }
                pending_test = false;
                i = end + 1;
                continue;
            }
            Token::Ident(first) => {
                // A path in code: ident (:: ident)+, not itself the tail of a longer path.
                let after_sep = i > 0 && tokens[i - 1] == Token::PathSep;
                let mut segments = vec![first.clone()];
                let mut j = i + 1;
                while tokens.get(j) == Some(&Token::PathSep) {
                    match tokens.get(j + 1) {
                        Some(Token::Ident(next)) => segments.push(next.clone()),
                        _ => break,
                    }
                    j += 2;
                }
                let long = segments.len() > 1;
                if !after_sep && long && !in_test(&braces) {
                    scan.paths.push(Reference {
                        segments,
                        inline: inline(&braces),
                        binds: None,
                    });
                }
                if long {
                    i = j;
                    continue;
                }
            }
            Token::Punct(';') => {
                pending_test = false;
                pending_path = None;
            }
            _ => {}
        }
        i += 1;
    }
    scan
}

enum Attr {
    CfgTest,
    Path(String),
    Other,
}

/// Reads the attribute starting at `tokens[start]` (`#`); returns what it is and the index
/// after its closing `]`.
fn attribute(tokens: &[Token], start: usize) -> (Attr, usize) {
    let mut i = start + 1;
    if tokens.get(i) == Some(&Token::Punct('!')) {
        i += 1;
    }
    if tokens.get(i) != Some(&Token::Punct('[')) {
        return (Attr::Other, start + 1);
    }
    let mut depth = 0;
    let mut end = i;
    while end < tokens.len() {
        match tokens[end] {
            Token::Punct('[') => depth += 1,
            Token::Punct(']') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
        end += 1;
    }
    let body = &tokens[i + 1..end.min(tokens.len())];
    let ident = |t: &Token, s: &str| matches!(t, Token::Ident(w) if w == s);
    let attr = match body {
        [c, Token::Punct('('), t, Token::Punct(')')] if ident(c, "cfg") && ident(t, "test") => {
            Attr::CfgTest
        }
        [p, Token::Punct('='), Token::Str(s)] if ident(p, "path") => Attr::Path(s.clone()),
        _ => Attr::Other,
    };
    (attr, end + 1)
}

/// The full paths of a `use` tree (`a::{b, c::{d, e as f}, self}`), each with the name it
/// binds (`None` for a glob).
fn use_tree(tokens: &[Token]) -> Vec<(Vec<String>, Option<String>)> {
    fn walk(
        tokens: &[Token],
        i: &mut usize,
        prefix: &[String],
        out: &mut Vec<(Vec<String>, Option<String>)>,
    ) {
        let mut path = prefix.to_vec();
        let mut binds = None;
        let mut glob = false;
        while *i < tokens.len() {
            match &tokens[*i] {
                Token::Ident(w) if w == "as" => {
                    if let Some(Token::Ident(alias)) = tokens.get(*i + 1) {
                        binds = Some(alias.clone());
                    }
                    *i += 2;
                }
                // `self` in a group names the group's prefix.
                Token::Ident(w) if w == "self" && !path.is_empty() => {
                    binds = path.last().cloned();
                    *i += 1;
                }
                Token::Ident(w) => {
                    path.push(w.clone());
                    binds = Some(w.clone());
                    *i += 1;
                }
                Token::Punct('*') => {
                    glob = true;
                    *i += 1;
                }
                Token::PathSep => *i += 1,
                Token::Punct('{') => {
                    *i += 1;
                    loop {
                        walk(tokens, i, &path, out);
                        match tokens.get(*i) {
                            Some(Token::Punct(',')) => *i += 1,
                            Some(Token::Punct('}')) => {
                                *i += 1;
                                break;
                            }
                            _ => break,
                        }
                    }
                    return;
                }
                Token::Punct(',') | Token::Punct('}') => break,
                _ => *i += 1,
            }
        }
        if !path.is_empty() {
            out.push((path, if glob { None } else { binds }));
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    walk(tokens, &mut i, &[], &mut out);
    out
}

/// Identifiers, `::`, punctuation and string contents; comments, char literals and numbers
/// dropped, raw identifiers unprefixed.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            let (s, end) = string(&chars, i + 1, 0);
            tokens.push(Token::Str(s));
            i = end;
        } else if (c == 'r' || c == 'b') && raw_string_start(&chars, i).is_some() {
            let (open, hashes) = raw_string_start(&chars, i).unwrap_or((i, 0));
            let (s, end) = string(&chars, open + 1, hashes);
            tokens.push(Token::Str(s));
            i = end;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let mut word: String = chars[start..i].iter().collect();
            if word == "r" && chars.get(i) == Some(&'#') {
                i += 1;
                let s = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                word = chars[s..i].iter().collect();
            }
            tokens.push(Token::Ident(word));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ':' && next == Some(':') {
            tokens.push(Token::PathSep);
            i += 2;
        } else {
            if !c.is_whitespace() {
                tokens.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    tokens
}

/// For `r"`, `r#"`, `br"`, `b"` at `i`: the index of the opening quote and the number of `#`.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let preceded_by_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    if preceded_by_ident {
        return None;
    }
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
        if chars.get(j) == Some(&'"') {
            return Some((j, 0));
        }
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some((j + hashes, hashes))
}

/// The contents of a string from `start` (after the quote) and the index after its end.
fn string(chars: &[char], start: usize, hashes: usize) -> (String, usize) {
    let mut i = start;
    let mut s = String::new();
    while i < chars.len() {
        if hashes == 0 && chars[i] == '\\' {
            i += 2;
            continue;
        }
        if chars[i] == '"'
            && chars[i + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
        {
            return (s, i + 1 + hashes);
        }
        s.push(chars[i]);
        i += 1;
    }
    (s, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(from: &str, to: &str) -> Edge {
        Edge {
            from: from.into(),
            to: to.into(),
            via: String::new(),
        }
    }

    #[test]
    fn a_two_file_cycle_is_found_and_a_chain_is_not() {
        let found = cycles(&[
            edge("a", "b"),
            edge("b", "a"),
            edge("c", "a"),
            edge("b", "d"),
        ]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].files, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(found[0].edges.len(), 2);
        assert!(cycles(&[edge("a", "b"), edge("b", "c"), edge("a", "c")]).is_empty());
    }

    #[test]
    fn a_long_cycle_is_one_component() {
        let found = cycles(&[
            edge("a", "b"),
            edge("b", "c"),
            edge("c", "a"),
            edge("x", "y"),
        ]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].files.len(), 3);
    }

    #[test]
    fn use_trees_expand_to_full_paths() {
        let tokens = tokenize("crate::a::{b::C, d::{self, E as F}, *}");
        let paths: Vec<(String, Option<String>)> = use_tree(&tokens)
            .into_iter()
            .map(|(p, b)| (p.join("::"), b))
            .collect();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            paths,
            vec![
                ("crate::a::b::C".into(), some("C")),
                ("crate::a::d".into(), some("d")),
                ("crate::a::d::E".into(), some("F")),
                ("crate::a".into(), None),
            ]
        );
    }

    /// The cycles of a crate made of `files` (path, contents), written under a fresh
    /// directory that is removed afterwards.
    fn cycles_of(name: &str, files: &[(&str, &str)]) -> std::io::Result<Vec<Cycle>> {
        let dir = std::env::temp_dir().join(format!("ambit-imports-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let file = dir.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(file, text)?;
        }
        let found = crate_cycles(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        found
    }

    #[test]
    fn a_cycle_between_a_module_and_a_file_outside_it_is_reported() -> std::io::Result<()> {
        let found = cycles_of(
            "cycle",
            &[
                (
                    "src/lib.rs",
                    "pub mod disc;
pub mod server;
",
                ),
                (
                    "src/disc/mod.rs",
                    "mod view;
pub use view::View;
use crate::server::Info;
pub struct Options;
",
                ),
                (
                    "src/disc/view.rs",
                    "pub struct View;
",
                ),
                (
                    "src/server.rs",
                    "use super::disc::{self, Options};
pub struct Info;
",
                ),
            ],
        )?;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].files,
            vec![
                PathBuf::from("src/disc/mod.rs"),
                PathBuf::from("src/server.rs")
            ]
        );
        Ok(())
    }

    #[test]
    fn tests_comments_strings_and_other_crates_make_no_edges() -> std::io::Result<()> {
        let found = cycles_of(
            "clean",
            &[
                (
                    "src/lib.rs",
                    "mod a;\nmod b;\n#[cfg(test)]\n#[path = \"a_tests.rs\"]\nmod a_tests;\n",
                ),
                ("src/a.rs", "use crate::b::B;\npub struct A(B);\n"),
                (
                    "src/b.rs",
                    "// crate::a::A is mentioned here only\nconst S: &str = \"crate::a::A\";\n\
                     use std::fmt;\nuse b_crate::a::A;\npub struct B;\n\
                     #[cfg(test)]\nmod tests { use crate::a::A; }\n",
                ),
                ("src/a_tests.rs", "use crate::a::A;\nuse crate::b::B;\n"),
            ],
        )?;
        assert!(found.is_empty(), "{found:?}");
        Ok(())
    }

    #[test]
    fn inline_paths_in_code_count() -> std::io::Result<()> {
        let found = cycles_of(
            "inline",
            &[
                ("src/lib.rs", "mod a;\nmod b;\n"),
                ("src/a.rs", "pub fn f() { crate::b::g() }\n"),
                ("src/b.rs", "pub fn g() { let _ = super::a::f; }\n"),
            ],
        )?;
        assert_eq!(found.len(), 1, "{found:?}");
        Ok(())
    }

    #[test]
    fn a_re_export_leads_to_the_defining_file() -> std::io::Result<()> {
        let found = cycles_of(
            "reexport",
            &[
                (
                    "src/lib.rs",
                    "mod a;
mod b;
pub use a::A;
pub use b::B;
",
                ),
                (
                    "src/a.rs",
                    "pub struct A(crate::B);
",
                ),
                (
                    "src/b.rs",
                    "use crate::A;
pub struct B;
fn f(_: A) {}
",
                ),
            ],
        )?;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].files,
            vec![PathBuf::from("src/a.rs"), PathBuf::from("src/b.rs")]
        );
        Ok(())
    }

    #[test]
    fn a_parent_fronting_its_children_is_not_a_cycle() -> std::io::Result<()> {
        let found = cycles_of(
            "facade",
            &[
                (
                    "src/lib.rs",
                    "pub mod state;
",
                ),
                (
                    "src/state/mod.rs",
                    "mod store;
mod policy;
pub use store::Store;
pub struct ConvertError;
                     pub fn load() { policy::check() }
",
                ),
                (
                    "src/state/store.rs",
                    "use super::ConvertError;
pub struct Store;
",
                ),
                (
                    "src/state/policy.rs",
                    "use super::{ConvertError, Store};
pub fn check() {}
",
                ),
            ],
        )?;
        assert!(found.is_empty(), "{found:?}");
        Ok(())
    }
}
