//! One module per subcommand.
pub mod agent;
pub mod app;
pub mod client;
pub mod dev;
pub mod machine;
pub mod server;
pub mod sweep;
