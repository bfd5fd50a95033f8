//! Shared test support, pulled into each integration test with `mod common;`.
// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod etcd_proc;
pub mod group;
pub mod ns;
