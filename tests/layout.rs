//! The library's module graph, read off the sources: dependencies flow one way (commands -> drivers -> run
//! directory -> core), `report` is called by the commands and never by a driver, and there is no import circle.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules that are the DARTS core: they know nothing of runs, drivers or reports.
const CORE: &[&str] = &[
    "space",
    "ops",
    "shared",
    "supernet",
    "architect",
    "genotype",
    "decision",
    "network",
    "optim",
    "data",
    "params",
    "evaluate",
    "recipe",
    "zoo",
    "native",
    "graphs",
    "profile",
    "progress",
    "viz",
    "dist",
    "interrupt",
];
/// Modules that drive runs.
const DRIVERS: &[&str] = &["driver", "run", "search", "train", "baseline", "compare", "bench", "deploy"];

/// Each top-level module of the library and the top-level modules its files name through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" || module == "cli" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let deps = g.entry(module.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let rest = &text[i + "crate::".len()..];
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                // Items of lib.rs (`crate::torch_rng_lock`) are not modules: only names with a file count.
                let is_module = src.join(format!("{name}.rs")).is_file() || src.join(&name).join("mod.rs").is_file();
                if is_module && name != module {
                    deps.insert(name);
                }
            }
        }
    }
    g
}

#[test]
fn dependencies_flow_one_way_without_circles() {
    let g = graph();
    assert!(g.len() > 20, "read too few modules: {g:?}");
    for m in CORE {
        assert!(g.contains_key(*m), "{m} is not a module any more: update this test");
    }
    // Core modules depend on core modules only.
    for m in CORE {
        let outside: Vec<&String> = g[*m].iter().filter(|d| !CORE.contains(&d.as_str())).collect();
        assert!(outside.is_empty(), "core module {m} depends on {outside:?}");
    }
    // The run directory's format depends on the core only; drivers never call the report.
    let rundir: Vec<&String> = g["rundir"].iter().filter(|d| !CORE.contains(&d.as_str())).collect();
    assert!(rundir.is_empty(), "rundir depends on {rundir:?}");
    for m in DRIVERS {
        assert!(!g[*m].contains("report"), "the driver {m} calls the report; the commands do");
    }
    // No circle: a depth-first search finds no back edge.
    fn visit<'a>(
        m: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => panic!("import circle: {} -> {m}", path.join(" -> ")),
            _ => {}
        }
        state.insert(m, 1);
        path.push(m);
        for d in g.get(m).into_iter().flatten() {
            visit(d, g, state, path);
        }
        path.pop();
        state.insert(m, 2);
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        visit(m, &g, &mut state, &mut Vec::new());
    }
}
