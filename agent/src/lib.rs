//! placeholder
pub mod fence;
pub mod pg;
