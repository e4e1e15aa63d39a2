//! Sandbox drivers and workspace volumes.
//!
//! [`namespace::NamespaceDriver`] implements [`berth_core::Driver`] with youki's
//! `libcontainer`; [`volume`] manages the per-session ext4 workspace images. See
//! `README.md` beside this crate for the setup sequence and the data-dir layout.

pub mod helper;
pub mod loopdev;
pub mod namespace;
pub mod volume;

pub use namespace::{NamespaceConfig, NamespaceDriver, NewDriverError};
