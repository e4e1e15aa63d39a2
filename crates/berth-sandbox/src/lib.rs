//! Sandbox drivers and workspace volumes.
//!
//! [`namespace::NamespaceDriver`] implements [`berth_core::Driver`] with youki's
//! `libcontainer`, [`microvm::MicroVmDriver`] with one QEMU microVM per session, and
//! [`Drivers`] picks between them by the runtime's isolation; [`volume`] manages the per-session ext4 workspace images. See
//! `README.md` beside this crate for the setup sequence and the data-dir layout.

mod common;
pub mod dispatch;
pub mod helper;
pub mod loopdev;
pub mod microvm;
pub mod namespace;
pub mod volume;

pub use dispatch::Drivers;
pub use microvm::{GuestImage, GuestImages, MicroVmConfig, MicroVmDriver};
pub use namespace::{NamespaceConfig, NamespaceDriver, NewDriverError};
