//! Dumps every intermediate activation of one prefill, for layer-by-layer comparison with
//! llama.cpp (crates/model/tools/compare_llama_cpp.py drives it).
//!
//! `cargo run -p kvfleet-model --example trace -- <model.gguf> <id,id,...> <out-dir> [avx2|avx512]`
//!
//! Writes `<out-dir>/<name>-<layer>.f32` (raw little-endian f32, `[tokens, width]`). Runs the
//! exact arithmetic (llama.cpp's rounding) unless `KVFLEET_KERNELS` names another path.
#![allow(clippy::print_stdout)]

use anyhow::Context;
use kvfleet_model::SeqInput;
use kvfleet_proto::BlockSize;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: trace <model.gguf> <id,id,...> <out-dir>";
    let path = args.next().context(usage)?;
    let ids: Vec<u32> = args
        .next()
        .context(usage)?
        .split(',')
        .map(|s| s.trim().parse().context("token id"))
        .collect::<anyhow::Result<_>>()?;
    let out = std::path::PathBuf::from(args.next().context(usage)?);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let kernels = match std::env::var("KVFLEET_KERNELS") {
        Ok(_) => kvfleet_model::KernelPath::from_env()?,
        Err(_) => kvfleet_model::KernelPath::exact(),
    };
    let mut m =
        kvfleet_model::load_with(std::path::Path::new(&path), kernels).context("loading model")?;
    match args.next().as_deref() {
        None | Some("avx512") => {}
        Some("avx2") => m.model.set_rounding(kvfleet_model::Rounding::LlamaCppAvx2),
        Some(other) => anyhow::bail!("unknown rounding `{other}` (avx2 or avx512)"),
    }
    let bs = BlockSize::default();
    let blocks = bs.blocks_for(ids.len()).max(1);
    let mut cache = m.model.new_cache(blocks, bs)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut err = None;
    m.model.forward_traced(
        &[SeqInput {
            tokens: &ids,
            start_pos: 0,
            block_table: &table,
            want_logits: true,
        }],
        &mut cache,
        &mut |name, layer, values| {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let file = out.join(format!("{name}-{layer}.f32"));
            if let Err(e) = std::fs::write(&file, bytes) {
                err.get_or_insert(anyhow::anyhow!("writing {}: {e}", file.display()));
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e);
    }
    println!("{} tokens traced into {}", ids.len(), out.display());
    Ok(())
}
