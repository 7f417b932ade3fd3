//! Integration tests against the real PostgreSQL, Redis and NATS, each test isolated in its own database, stream,
//! subject prefix and Redis prefix.

mod billing;
mod cli;
mod end_to_end;
mod faults_worker;
mod harness;
mod pipeline;
mod private_servers;
mod servers;
