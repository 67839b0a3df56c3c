//! Acceptance suite of the control-plane issue, against the REAL binaries.
//!
//! One test binary with `t<NN>_*` modules (openraft's layout) so the suite links once.
//! Every test starts its own processes on free 127.0.0.1 ports in its own directory; see
//! `dr_tests` for the harness. Build the binaries first: `cargo build --workspace`
//! (scripts/test.sh does).

mod t00_harness;
mod t05_example_configs;
mod t10_basic;
mod t20_leader_crash;
mod t30_partition;
mod t32_lost_majority;
mod t33_stale_reads;
mod t35_clean_shutdown;
mod t40_refusals;
mod t50_exactly_once;
mod t60_demo;
mod t70_incidents;
