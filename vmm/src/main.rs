//! `thvc-vmm`: boot one VM and exit with a status that tells a supervisor how it ended.

use clap::error::ErrorKind;
use clap::Parser;
use thvc_vmm::config::{host_memory_mib, Cli, VmConfig};
use thvc_vmm::exit::{EXIT_ERROR, EXIT_OK, EXIT_USAGE};

fn main() {
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    // One line, no backtrace: operators read this in the journal.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("thvc-vmm: internal error: {info}");
    }));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        // Colours only for a person at a terminal, not in a supervisor's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return EXIT_OK;
        }
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid usage");
            eprintln!(
                "thvc-vmm: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return EXIT_USAGE;
        }
    };
    let host_mib = match host_memory_mib() {
        Ok(mib) => mib,
        Err(e) => {
            eprintln!("thvc-vmm: cannot read the host's memory size: {e}");
            return EXIT_ERROR;
        }
    };
    let config = match VmConfig::from_cli(cli, host_mib) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("thvc-vmm: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(e) = thvc_vmm::sandbox::close_inherited_fds(&config.inherited_fds()) {
        eprintln!("thvc-vmm: cannot close inherited file descriptors: {e}");
        return EXIT_ERROR;
    }
    match thvc_vmm::vmm::run(config) {
        Ok(reason) => {
            tracing::info!(?reason, "VM ended");
            reason.status()
        }
        Err(e) => {
            // The messages already include their causes: print them once.
            eprintln!("thvc-vmm: {e}");
            e.status()
        }
    }
}
