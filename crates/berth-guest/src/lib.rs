//! `berth guest`: the agent that runs as PID 1 inside every sandbox, and the guest
//! protocol (gRPC over one byte stream) that the host uses to drive it.

pub mod proto {
    #![allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]
    tonic::include_proto!("berth.guest.v1");
}

pub mod agent;
pub mod client;
