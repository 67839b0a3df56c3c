//! Emergency credential rotation (DRP scenario 3, `rotate-credentials --emergency`).
//!
//! So far: [`atomic_file`], the all-or-nothing file replacement every rotated secret and the
//! saved isolation ruleset go through. The `rotate-credentials` verb follows.

pub mod atomic_file;
