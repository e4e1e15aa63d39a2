//! Sandbox drivers and workspace volumes.

pub mod helper;
