//! The README's layer list is the rule: every top-level module of `src/` stands in exactly one
//! layer, and no module names (`crate::x`) a module of a higher layer outside its tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level module → layer number, from the numbered list under the README's "## Layout".
fn layers() -> BTreeMap<String, usize> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let layout = readme
        .split("\n## Layout")
        .nth(1)
        .expect("a ## Layout section in README.md");
    let mut out = BTreeMap::new();
    let mut layer = 0;
    for line in layout.lines().take_while(|l| !l.starts_with("```")) {
        if let Some((n, _)) = line.split_once(". **") {
            if let Ok(n) = n.trim().parse::<usize>() {
                layer = n;
            }
        }
        if layer == 0 {
            continue;
        }
        // Backticked names that look like modules: `util.rs`, `checkpoint/`, `render*`.
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 1 && (part.ends_with(".rs") || part.ends_with('/') || part.ends_with('*')) {
                let name = part.trim_end_matches(['/', '*']).trim_end_matches(".rs");
                if !name.contains(['/', ' ', '.']) {
                    out.insert(name.to_string(), layer);
                }
            }
        }
    }
    assert!(
        out.len() > 10,
        "the README's layer list was not found: {out:?}"
    );
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module names a source file reaches through `crate::`, comments and its test module left out.
fn crate_paths(src: &str) -> Vec<String> {
    let code: String = src
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap()
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c};`: each item's first segment.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let first = item.trim().split("::").next().unwrap_or("");
                names.push(first.to_string());
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..end].to_string());
        }
    }
    names
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let layers = layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        if top == "lib" || top == "main" {
            continue;
        }
        let own = *layers
            .get(top)
            .unwrap_or_else(|| panic!("src/{top} stands in no layer of the README's list"));
        for name in crate_paths(&std::fs::read_to_string(f).unwrap()) {
            if let Some(&theirs) = layers.get(&name) {
                if theirs > own {
                    upward.push(format!(
                        "{} (layer {own}) uses crate::{name} (layer {theirs})",
                        rel.display()
                    ));
                }
            }
        }
    }
    upward.sort();
    upward.dedup();
    assert!(
        upward.is_empty(),
        "imports from a higher layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    let layers = layers();
    let names = crate_paths(
        "use crate::{engine::Engine, util};\nfn f() { crate::serve::x() } // crate::cli\n",
    );
    assert_eq!(names, ["engine", "util", "serve"]);
    assert!(layers["serve"] > layers["engine"] && layers["engine"] > layers["util"]);
}
