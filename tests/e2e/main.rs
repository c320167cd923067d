//! End-to-end tests: one binary, the real server in process, the platform, browser and agent
//! played with the protocol crate over real HTTP on loopback (and once in a real browser).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod binding;
mod browser;
mod checker_faults;
mod client;
mod credentials;
mod egress;
mod envelope;
mod exfiltration;
mod faults;
mod mcp;
mod metrics;
mod minting;
mod openapi;
mod ops;
mod owner;
mod persistence;
mod policy;
mod protocol24;
mod proxy;
mod refresh;
mod release;
mod replicas;
mod signed;
mod signing;
mod storage;
mod store_page;
mod streaming;
mod tls;
mod wire;
