//! The `keyholder` command: parses the command line and runs the command (see `keyholder::cli`,
//! one module per command).

fn main() -> std::process::ExitCode {
    keyholder::cli::main()
}
