//! `ferry server`: the API server alone, for fleets whose hosts run `ferry agent` themselves.

use anyhow::{Context, Result};
use ferry_api::server::{self, Ctx};
use ferry_store::SqliteStore;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Where the store (SQLite) and new volumes live.
    #[arg(long, default_value = "/var/lib/ferry/server")]
    state_dir: PathBuf,
    /// The API listener.
    #[arg(long, default_value = "127.0.0.1:4280")]
    listen: std::net::SocketAddr,
    /// A registry to pull images from over plain HTTP (repeatable; loopback ones always are).
    #[arg(long, value_name = "ADDR")]
    registry: Vec<String>,
    /// Registry credentials, a JSON file: `{"reg.example:5000": {"username": "u", "password":
    /// "p"}, "other.example": {"token": "..."}}`; never logged or shown.
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
}

pub fn run(args: ServerArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let store = Arc::new(SqliteStore::open(args.state_dir.join("ferry.db"))?);
    let ctx = Ctx::new(store, args.state_dir.join("volumes"));
    super::image::apply_registry_flags(&ctx, &args.registry, args.registry_auth.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        eprintln!("ferry server: API on http://{}", args.listen);
        axum::serve(listener, server::router(ctx)).await?;
        Ok(ExitCode::SUCCESS)
    })
}
