//! Integration tests against the real PostgreSQL, Redis and NATS, each test isolated in its own database, stream,
//! subject prefix and Redis prefix.

mod billing;
mod cli;
mod connections;
mod dashboard;
mod end_to_end;
mod faults_publisher;
mod faults_worker;
mod gateways;
mod harness;
mod namespace;
mod pipeline;
mod private_servers;
mod ratelimit;
mod servers;
