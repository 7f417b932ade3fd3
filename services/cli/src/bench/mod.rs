//! The benchmarks the binary ships (`tollgate bench …`; figures in BENCHMARKS.md). Each makes its own database,
//! stream and Redis prefix on the configured servers and removes them afterwards (`namespace.rs`).
//!
//! - `verify.rs`: full verification against a trivial handler, driven by the lean HTTP client of `client.rs`, with
//!   the servers started as child processes (`processes.rs`) and their CPU time and memory read from `/proc`
//!   (`cpu.rs`);
//! - `pipeline.rs`: usage events through JetStream and the workers into PostgreSQL.

mod client;
mod cpu;
mod namespace;
pub mod pipeline;
mod processes;
pub mod verify;

pub use processes::trivial_server;
