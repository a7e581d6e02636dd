//! `ferry sweep` (placeholder until the sweep crate lands).
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct SweepArgs {
    paths: Vec<std::path::PathBuf>,
}

pub fn run(_args: SweepArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("sweep is not built yet")
}
