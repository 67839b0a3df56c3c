//! Acceptance suite of the regional-failover issue (issue 5), against the REAL binaries.
//!
//! t10 needs only coordinators and agents (topology, plans, refusals). t20 is the planned
//! switchover with real PostgreSQL 15 (primary + streaming replica, `pg_pair`) and a writer.
//! t30..t70 are the failures (shared fixture in `t30_region_cut`: PostgreSQL pair with
//! replication through the fault layer, 15 ms each way between regions, a writer logging
//! which server acknowledged what and when): region cut, primary agent cut, leader killed at
//! each plan step, two regions without a witness, candidate lag above the RPO + `--force`.

mod pg_pair;
mod t10_topology;
mod t20_switchover;
mod t25_traffic;
mod t30_region_cut;
mod t40_agent_cut;
mod t50_leader_kill_steps;
mod t60_two_region;
mod t70_lag_force;
mod t80_failback;
