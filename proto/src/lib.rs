//! Quiver's wire API: the public `quiver.v1` protobuf package, the operators'
//! `quiver.admin.v1` package, the internal
//! node-to-node `quiver.peer.v1` package (not a public API: postcard payloads,
//! same-version nodes only, though reflection lists it), the tonic client and
//! server code generated from them, and the descriptor set for gRPC
//! reflection.
//!
//! Architecture invariant: this crate holds no logic beyond generated code and
//! the codec that maps malformed messages to `INVALID_ARGUMENT`. It must never
//! depend on the engine, the server or any storage crate.

pub mod codec;

/// Package `quiver.v1`. The module tree mirrors the proto package, as tonic's
/// generated code and reflection expect.
pub mod quiver {
    /// Version 1 of the API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("quiver.v1");
    }

    /// The operator API (`quiverctl`).
    pub mod admin {
        /// Version 1.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            tonic::include_proto!("quiver.admin.v1");
        }
    }

    /// The internal node-to-node service.
    pub mod peer {
        /// Version 1.
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            tonic::include_proto!("quiver.peer.v1");
        }
    }
}

pub use quiver::admin::v1 as admin;
pub use quiver::peer::v1 as peer;
pub use quiver::v1;

/// Encoded `FileDescriptorSet` of every Quiver proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/quiver_descriptor.bin"));
