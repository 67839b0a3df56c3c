//! Replacing a file so that every reader sees either the whole old or the whole new content
//! (secret files, firewall rules, integrity baselines). The implementation is shared with
//! certificate rotation in [`dr_proto::atomic_file`].

pub use dr_proto::atomic_file::{AtomicWriteError, write_atomic};
