//! `kvfleet-agent`: not implemented yet; says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "kvfleet-agent {}: the node agent is not implemented yet (see the agent issue); \
         nothing was started",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
