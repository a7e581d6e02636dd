//! `ferry`: the one binary. Flags and glue only; the work lives in the library crates.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// ferry runs machines on a fleet of Linux hosts, gives them private IPv6 addresses that
/// embed their host (fdaa:net:host:machine), and moves them between hosts.
#[derive(Parser)]
#[command(name = "ferry", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a whole dev fleet on this box, or clean up after one.
    Dev(cmd::dev::DevArgs),
    /// Find (and optionally rewrite) literal fleet addresses in config files.
    Sweep(cmd::sweep::SweepArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "warn,netlink_packet_route=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Dev(args) => cmd::dev::run(args),
        Cmd::Sweep(args) => cmd::sweep::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
