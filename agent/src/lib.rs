//! Pairvisor's per-host agent: the only process that opens its host's libvirt connection and
//! talks to QEMU. The controllers call its gRPC service (`pairvisor.agent.v1`) to define,
//! start and stop domains, manage volumes and read guest consoles. Guests outlive the agent;
//! a restarted agent re-attaches to them.
#![deny(missing_docs)]

pub mod config;
pub mod disk_fault;
pub mod domain;
pub mod embed;
pub mod export;
pub mod facts;
pub mod fence;
pub mod ft;
pub mod heartbeat;
pub mod import;
pub mod isos;
pub mod libvirt;
pub mod membership;
pub mod mirror;
pub mod nbd;
pub mod qemu_img;
pub mod qmp_block;
pub mod replica;
pub mod screen;
pub mod seek;
pub mod serial;
pub mod service;
pub mod snapshot;
pub mod stale;
pub mod storage;
pub mod upload;
pub mod vnc;
