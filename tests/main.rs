//! Integration tests: one binary, a real Postgres for each test (see `support`).

mod support;

mod capture;
mod durability;
mod fidelity;
