//! `kvfleet-agent`: parse → build → run → drain, all in the library (`kvfleet_agent::cli`).

fn main() -> std::process::ExitCode {
    kvfleet_agent::cli::main()
}
