//! placeholder
pub mod traffic;
