//! The `darts` command line: parses arguments and calls the library.
use clap::Parser;
use std::sync::Mutex;

mod cli;

/// The message of a panic inside the run (libtorch reports failures such as out-of-memory by panicking
/// through tch), kept so that it can be reported as an error instead of a backtrace.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() {
    darts::openmp::restart_with(&darts::openmp::startup_settings());
    darts::allocator::keep_freed_memory();
    let args = cli::Cli::parse();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".into());
        let at = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg}{at}"));
    }));
    let result = std::panic::catch_unwind(|| cli::run(args));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if let Some(stop) = e.downcast_ref::<darts::interrupt::Interrupted>() {
                eprintln!("{stop}");
                std::process::exit(darts::interrupt::Interrupted::EXIT_CODE);
            }
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            let msg = PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            eprintln!("error: {}", darts::explain_failure(&msg));
            std::process::exit(2);
        }
    }
}
