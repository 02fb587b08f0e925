//! The parts of the `ipop` daemon that read input from outside and can be used on their own:
//! the config file, the DNS responder, the metrics endpoint, the control socket and the status
//! they serve, and the receive coalescer that merges the packets peers send. The `ipop` binary is built on them; the fuzz targets in `fuzz/` call the parsers
//! directly. This is not a stable API.

pub mod coalesce;
pub mod config;
pub mod control;
pub mod dns;
pub mod metrics;
pub mod portmap;
pub mod status;
