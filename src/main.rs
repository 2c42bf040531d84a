#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;

use tracing_subscriber::EnvFilter;

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Training frees and re-allocates the same large activation buffers every step; returning
    // them to the OS made a quarter of the CPU time page zeroing. Keep them (unless the user set
    // MIMALLOC_PURGE_DELAY).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; mimalloc allows it at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match cli::parse(args) {
        Ok(c) => c,
        Err(e) => match e.downcast::<clap::Error>() {
            // --help, --version, or a bad flag: clap prints it and picks the status.
            Ok(ce) => ce.exit(),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
    };
    let default = if cli.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LLARA_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    if let Err(e) = cli::run(cli) {
        if let Some(i) = e.downcast_ref::<llara::interrupt::Interrupted>() {
            // Stopped by a signal after saving what it could: the shell's 128 + signal status.
            eprintln!("{i}");
            std::process::exit(i.signal.exit_code());
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
