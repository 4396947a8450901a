//! The `omniflow` binary: a thin shell over the library's CLI.

fn main() -> std::process::ExitCode {
    // A panic is logged where the logs go, and costs the run it happened in, not the process.
    omniflow::engine::panics::install_hook();
    omniflow::cli::main()
}
