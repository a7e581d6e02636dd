//! The handlers of the public API that are not about apps and machines, one module per area.

pub mod bridge;
pub mod dashboard;
pub mod images;
pub mod logs;
pub mod migrate;
