//! The `lntune` binary: parse, run, map the result to an exit code.

use std::process::ExitCode;

use clap::Parser;

// counts live heap bytes for `lntune bench` (see util::heap)
#[global_allocator]
static ALLOC: lntune::util::heap::CountingAlloc = lntune::util::heap::CountingAlloc;

fn main() -> ExitCode {
    lntune::util::heap::mark_installed();
    let cli = lntune::cli::Cli::parse();
    if let Some(n) = cli.threads {
        if !(1..=1024).contains(&n) {
            eprintln!("error: --threads must be between 1 and 1024, got {n}");
            return ExitCode::from(1);
        }
        // candle's CPU kernels and gemm read the rayon thread count; set it before any
        // kernel runs (nothing else is running yet).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    match lntune::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
