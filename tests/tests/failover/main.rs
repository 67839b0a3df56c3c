//! Acceptance suite of the regional-failover issue (issue 5), against the REAL binaries.
//!
//! t10 needs only coordinators and agents (topology, plans, refusals). t20 is the planned
//! switchover with real PostgreSQL 15 (primary + streaming replica, `pg_pair`) and a writer.
//! Still to come: region cut, leader killed at each step, traffic through nginx/DNS.

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
