//! Acceptance suite of the regional-failover issue (issue 5), against the REAL binaries.
//!
//! t10 needs only coordinators and agents (topology, plans, refusals). The PostgreSQL
//! acceptance cases (switchover with a writer, region cut, leader killed at each step)
//! need the agent's pg and traffic verbs and are added once those are merged.

mod t10_topology;
