//! Loading a model for a command: a spinner on stderr while the weights load (a large GGUF
//! takes seconds), errors with the path in their context, and the native engine built over it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kvfleet_engine::{PoolSizing, SchedulerConfig};
use kvfleet_model::{KvBudget, LoadedModel, NativeEngine};

/// Loads the model at `path` (a `.gguf` file or a Hugging Face directory) with a spinner.
pub(crate) fn model(path: &Path) -> anyhow::Result<Arc<LoadedModel>> {
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
    let loaded = kvfleet_model::load(path);
    spinner.finish_and_clear();
    let loaded = loaded.with_context(|| format!("loading model {}", path.display()))?;
    eprintln!(
        "loaded {} ({}, {:.1} M parameters) in {:.2} s",
        path.display(),
        loaded.info.architecture,
        loaded.info.parameters as f64 / 1e6,
        start.elapsed().as_secs_f64()
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
