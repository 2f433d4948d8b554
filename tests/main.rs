//! Integration tests: one binary, a real Postgres for each test (see `support`).

mod support;

mod acceptance;
mod access;
mod auth;
mod browser;
mod capture;
mod continuity;
mod delivery;
mod demo;
mod durability;
mod emit;
mod faults;
mod fidelity;
mod first_start;
mod metadata;
mod nats;
mod pgwire;
mod predicates;
mod publish;
mod replay;
mod scaled;
mod switch;
mod tail;
mod tls;
mod triggers;
