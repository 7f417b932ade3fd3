//! What the validator, the workers and the CLI share: the domain vocabulary, the key format, the usage event and
//! its codec, configuration, connections, listening sockets, the JetStream topology, metrics, and the operations on
//! keys and organizations.

pub mod admin;
pub mod codec;
pub mod config;
pub mod connect;
pub mod domain;
pub mod event;
pub mod key;
pub mod listen;
pub mod metrics;
pub mod quota_counter;
pub mod topology;
