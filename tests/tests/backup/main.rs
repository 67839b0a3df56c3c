//! Acceptance suite of the backups issue (issue 3) through the coordinator, against the REAL
//! binaries: coordinators, an agent on a host with a real PostgreSQL 15 primary whose
//! archive_command is `dr-agent wal-push`, an fs repository, and `drctl backup ...`.

mod t10_catalog;
mod t20_logical_files;
mod t30_wal_archive;
mod t40_s3_outage;
mod t50_schedule_leader_change;
