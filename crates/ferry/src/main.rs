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
    /// Machines: run, list, status, stop, start, destroy, exec, migrate.
    Machine(cmd::machine::MachineArgs),
    /// Apps: create, list, destroy, policy (how their machines migrate).
    App(cmd::app::AppArgs),
    /// Hosts: list, drain, cordon, uncordon.
    Host(cmd::app::HostArgs),
    /// Volumes: list, create.
    Volume(cmd::app::VolumeArgs),
    /// OCI images on the hosts: pull (with progress), list, rm; registry settings.
    Image(cmd::image::ImageArgs),
    /// Migrations: list, status, watch.
    Migration(cmd::migrate::MigrationArgs),
    /// The address-mapping bridge: map, list, report, retire, enable, disable.
    Bridge(cmd::bridge::BridgeArgs),
    /// API tokens: create (--org, --admin, --join), list, revoke.
    Token(cmd::token::TokenArgs),
    /// Find (and optionally rewrite) literal fleet addresses in config files.
    Sweep(cmd::sweep::SweepArgs),
    /// The API server alone (hosts run `ferry agent` and register with it).
    Server(cmd::server::ServerArgs),
    /// The per-host agent (started by `ferry dev`, or by the host's init system).
    #[command(hide = true)]
    Agent(cmd::agent::AgentArgs),
    /// PID 1 of every machine (started by the agent).
    #[command(hide = true)]
    Init(ferry_runtime::InitArgs),
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
        Cmd::Token(args) => cmd::token::run(args),
        Cmd::Machine(args) => cmd::machine::run(args),
        Cmd::Bridge(args) => cmd::bridge::run(args),
        Cmd::App(args) => cmd::app::run(args),
        Cmd::Host(args) => cmd::app::host(args),
        Cmd::Volume(args) => cmd::app::volume(args),
        Cmd::Image(args) => cmd::image::run(args),
        Cmd::Migration(args) => cmd::migrate::run(args),
        Cmd::Agent(args) => cmd::agent::run(args),
        Cmd::Server(args) => cmd::server::run(args),
        Cmd::Init(args) => cmd::agent::init(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
