//! `kvfleet sim` without the CLI crate:
//! `cargo run --release -p kvfleet-sim --example sim -- --trace FILE --workers 8 --mode all`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sim",
    about = "Replay a request trace on mock-engine workers in virtual time"
)]
struct Cli {
    #[command(flatten)]
    sim: kvfleet_sim::SimArgs,
}

fn main() -> anyhow::Result<()> {
    kvfleet_sim::cli_main(Cli::parse().sim)
}
