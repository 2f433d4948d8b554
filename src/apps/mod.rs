//! Programs built on the library, beside the pipeline rather than in it: the one-command demo,
//! the terminal subscriber, the one-event publisher (`emit`), and the throwaway clusters (Postgres;
//! NATS for the scaled roles) the demo, the tests and the benchmarks start.

pub mod cluster;
pub mod demo;
pub mod emit;
pub mod nats_cluster;
pub mod tail;
