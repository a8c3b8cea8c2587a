//! The `chatvec` binary: the command line (`cli`), the demo, the benchmark
//! and its synthetic checkpoints, over the library's entry points. `main`
//! parses, runs, and turns an error into its exit code and a hint.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use chatvec::ui::printable;
use chatvec::{EXIT_INPUT, EXIT_OK};
use cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; usage errors are bad input.
            return ExitCode::from(if e.use_stderr() { EXIT_INPUT as u8 } else { EXIT_OK as u8 });
        }
    };
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message already carries its cause (e.g. the OS error).
            // Escaped and cut: messages quote names from untrusted inputs.
            eprintln!("error: {}", printable(&e.to_string()));
            if let Some(h) = e.hint() {
                eprintln!("hint: {}", printable(h));
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
