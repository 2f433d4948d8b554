//! Programs built on the library, beside the pipeline rather than in it: the one-command demo,
//! the terminal subscriber, the one-event publisher (`emit`), and the throwaway clusters the demo and the tests start.

pub mod cluster;
pub mod demo;
pub mod emit;
pub mod tail;
