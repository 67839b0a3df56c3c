//! Acceptance suite of the restore issue (issue 4) against the REAL binaries: three
//! coordinators, two agents in two regions, a real PostgreSQL 15 primary archiving through
//! `dr-agent wal-push` into an fs repository, and `drctl restore` / `drctl drill` /
//! standalone `dr-agent restore`.

mod t10_pitr;
mod t20_cancel;
mod t30_timeline;
