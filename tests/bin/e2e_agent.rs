//! `kvfleet-agent` built in this package, so that its tests can name it
//! (`CARGO_BIN_EXE_kvfleet-e2e-agent`): the worker program of in-process agents, and the whole
//! agent for tests that run agents as processes and read their logs.

fn main() -> std::process::ExitCode {
    kvfleet_agent::cli::main()
}
