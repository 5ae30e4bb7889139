//! Rota: a durable job coordinator.
//!
//! One coordinator process keeps the job queue in an embedded sled database and
//! leases jobs over long-lived gRPC streams to worker processes on any number of
//! hosts. See `README.md` and `DESIGN.md` for the whole picture.
//!
//! - [`proto`]: the generated wire contract (`rota.v1`).
//! - [`coordinator`]: the coordinator library; `rota-coordinator` is a thin CLI over it.
//! - [`worker`]: the worker SDK and the command runner behind `rota-worker`.

pub mod coordinator;
pub mod worker;

/// The generated wire contract, package `rota.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("rota.v1");

    /// The encoded file-descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rota_descriptor");
}
