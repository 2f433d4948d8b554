//! Programs built on the library, beside the pipeline rather than in it: the one-command demo,
//! the terminal subscriber, and the throwaway clusters the demo and the tests start.

pub mod cluster;
pub mod demo;
pub mod tail;
