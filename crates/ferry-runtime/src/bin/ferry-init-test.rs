//! A stand-in for the `ferry` binary's `init` subcommand, so this crate's integration tests can
//! spawn machines without depending on the main binary (which depends on this crate).

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PID 1 of a machine (see `ferry_runtime::init`).
    Init(ferry_runtime::InitArgs),
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Init(args) => std::process::exit(ferry_runtime::init_main(args)),
    }
}
