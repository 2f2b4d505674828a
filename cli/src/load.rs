//! Loading a model for a command: a spinner on stderr while the weights load (a large GGUF
//! takes seconds), errors with the path in their context, and the native engine built over it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kvfleet_engine::{PoolSizing, SchedulerConfig};
use kvfleet_model::{KernelPath, KvBudget, LoadedModel, NativeEngine};

/// Which kernels a command runs, as its `--kernels` / `--exact` flags say.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct KernelArgs {
    /// The arithmetic kernels: `auto` (the fastest this CPU runs: `avx512-vnni`, `avx2` or
    /// `portable`), `exact` (llama.cpp's rounding, bit for bit: slower), or one instruction set
    /// by name. Default: `KVFLEET_KERNELS`, else `auto`.
    #[arg(long, value_parser = parse_kernels, conflicts_with = "exact")]
    pub(crate) kernels: Option<KernelPath>,
    /// Shorthand for `--kernels exact`: reproduce llama.cpp's outputs bit for bit.
    #[arg(long)]
    pub(crate) exact: bool,
}

impl KernelArgs {
    /// The path asked for; `None`: the default (`KVFLEET_KERNELS`, else the fastest).
    pub(crate) fn path(&self) -> Option<KernelPath> {
        if self.exact {
            Some(KernelPath::exact())
        } else {
            self.kernels
        }
    }
}

fn parse_kernels(s: &str) -> Result<KernelPath, String> {
    s.parse()
        .map_err(|e: kvfleet_model::KernelChoiceError| e.to_string())
}

/// Loads the model at `path` (a `.gguf` file or a Hugging Face directory) with a spinner, on
/// `kernels` (`None`: `KVFLEET_KERNELS`, else the fastest this CPU runs).
pub(crate) fn model(path: &Path, kernels: Option<KernelPath>) -> anyhow::Result<Arc<LoadedModel>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("loading model {}", path.display()))?;
    let size = if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        meta.len()
    };
    // Hidden automatically when stderr is not a terminal (tests, pipes, journald).
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "loading {} ({:.1} MB)",
        path.display(),
        size as f64 / 1e6
    ));
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        spinner.set_style(style);
    }
    spinner.enable_steady_tick(Duration::from_millis(100));
    let start = Instant::now();
    let loaded = match kernels {
        Some(k) => kvfleet_model::load_with(path, k),
        None => kvfleet_model::load(path),
    };
    spinner.finish_and_clear();
    let loaded = loaded.with_context(|| format!("loading model {}", path.display()))?;
    eprintln!(
        "loaded {} ({}, {:.1} M parameters) in {:.2} s; kernels {}",
        path.display(),
        loaded.info.architecture,
        loaded.info.parameters as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        loaded.model.kernel_path()
    );
    Ok(Arc::new(loaded))
}

/// The KV pool for a run: the operator's budget when given, else exactly what `tokens` tokens
/// in total need (capped by nothing: the caller bounds `tokens` by the context).
pub(crate) fn kv_sizing(budget: Option<KvBudget>, tokens: usize) -> anyhow::Result<PoolSizing> {
    match budget {
        Some(b) => b.sizing().context("sizing the KV cache"),
        None => {
            let blocks = kvfleet_proto::BlockSize::default().blocks_for(tokens.max(1)) + 1;
            let blocks = u32::try_from(blocks).context("KV cache of more than 2^32 blocks")?;
            Ok(PoolSizing::Blocks(blocks))
        }
    }
}

/// A native engine over `model`.
pub(crate) fn engine(
    model: &Arc<LoadedModel>,
    config: SchedulerConfig,
) -> anyhow::Result<NativeEngine> {
    kvfleet_model::native_engine_from(Arc::clone(model), config).context("building the engine")
}
