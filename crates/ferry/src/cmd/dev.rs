//! `ferry dev`.
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct DevArgs {}

pub fn run(_args: DevArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
