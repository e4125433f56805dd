//! The module layering written in ARCHITECTURE.md ("Layering, bottom up"):
//! every `crate::<module>` path in a module's source names a module listed
//! before it. A cycle (such as `fetch` <-> `gguf` before) or library code
//! that reaches up into the CLI fails here with the file and line.

use std::path::Path;

/// Bottom up; a module may import only the ones before it.
const ORDER: &[&str] = &[
    "error",
    "gguf",
    "gpu",
    "testutil",
    "tensor",
    "qtensor",
    "config",
    "ops",
    "loader",
    "program",
    "taps",
    "model",
    "reference",
    "compare",
    "tokenizer",
    "fuzzing",
    "chat",
    "sampling",
    "verify",
    "fetch",
    "tune",
    "generate",
    "bench",
    "serve",
    "cli",
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for lib.rs
/// and main.rs, which may import anything).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

#[test]
fn modules_import_only_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let mut bad = Vec::new();
    let mut seen_modules = std::collections::BTreeSet::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        seen_modules.insert(m.clone());
        let Some(mine) = rank(&m) else {
            bad.push(format!(
                "{}: module `{m}` is not in ORDER (add it where it belongs)",
                f.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let dep: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if dep == m || dep.is_empty() {
                    continue;
                }
                match rank(&dep) {
                    Some(r) if r < mine => {}
                    Some(_) => bad.push(format!(
                        "{}:{}: `{m}` imports `{dep}`, which is not below it",
                        f.display(),
                        i + 1
                    )),
                    // Items re-exported at the crate root (crate::Result, ...).
                    None => {}
                }
            }
        }
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
    // The check can fail: every listed module exists, so ORDER is not stale.
    for m in ORDER {
        assert!(seen_modules.contains(*m), "ORDER lists `{m}`, not in src/");
    }
}
