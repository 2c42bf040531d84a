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
    // Under mpirun/srun: this process's rank of the run (one process: a no-op communicator).
    let comm = match llara::comm::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
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
    // Rank 0 speaks for a data-parallel run; the others only warn.
    let default = if cli.quiet || comm.rank() > 0 {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LLARA_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let (rank, size) = (comm.rank(), comm.size());
    let result = cli::run(cli, &*comm);
    let code = match result {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<llara::interrupt::Interrupted>() {
            // Stopped by a signal after saving what it could (every rank at the same step):
            // the shell's 128 + signal status.
            Some(i) => {
                if rank == 0 {
                    eprintln!("{i}");
                }
                i.signal.exit_code()
            }
            None if size > 1 => {
                // The other ranks may be waiting in a collective: end them all.
                eprintln!("error: rank {rank} of {size}: {e:#}");
                comm.abort(1)
            }
            None => {
                eprintln!("error: {e:#}");
                1
            }
        },
    };
    // Finalizes MPI (when the run spans several processes) before the status is returned.
    drop(comm);
    std::process::exit(code);
}
