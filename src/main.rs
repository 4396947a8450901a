//! The `omniflow` binary: a thin shell over the library's CLI.

fn main() -> std::process::ExitCode {
    omniflow::cli::main()
}
