//! One module per subcommand.
pub mod agent;
pub mod app;
pub mod bridge;
pub mod client;
pub mod control;
pub mod dev;
pub mod dns;
pub mod image;
pub mod machine;
pub mod migrate;
pub mod server;
pub mod sweep;
pub mod tls;
pub mod token;
