//! The `chatvec` binary: parse, run, and turn errors into an exit code.

use std::process::ExitCode;

use clap::Parser;

use chatvec::cli::{Cli, run};
use chatvec::error::{EXIT_INPUT, EXIT_OK};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; usage errors are bad input.
            return ExitCode::from(if e.use_stderr() { EXIT_INPUT as u8 } else { EXIT_OK as u8 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message already carries its cause (e.g. the OS error).
            eprintln!("error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
