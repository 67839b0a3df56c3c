//! Building blocks of the integration harness; see the crate docs for how they fit.

pub mod backup;
pub mod bins;
pub mod certs;
pub mod cluster;
pub mod faults;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod testdir;
pub mod wait;
