//! The wire contract of the YesLocker DR control plane.
//!
//! Three gRPC services (`AgentService`, `ControlService`, `RaftService`) generated at build
//! time from `proto/dr/v1` with protox, so no system `protoc` is needed. Generated types
//! also derive serde so the coordinator can keep them in its Raft state and drctl can
//! print them with `--output json`.
//!
//! Beside the generated code lives what every process needs to speak the contract
//! safely: identities carried in certificate SAN URIs ([`identity`]) and the mutual-TLS
//! plumbing with certificate reload ([`tls`]).

pub mod pb {
    #![allow(clippy::all, clippy::pedantic, unused_qualifications, rust_2018_idioms)]
    tonic::include_proto!("dr.v1");

    /// Encoded `FileDescriptorSet`, for gRPC reflection or grpcurl.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dr_descriptor");
}

pub mod atomic_file;
pub mod audit_chain;
pub mod cert_rotation;
pub mod codec;
pub mod identity;
pub mod tls;
