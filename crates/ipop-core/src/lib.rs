//! The protocol brain of ipop: a deterministic, sans-IO state machine.
//!
//! Nothing in this crate opens a socket, reads a clock or spawns a task. The daemon feeds it
//! what happened (a packet from the TUN device, a datagram from the network, the passing of
//! time) and carries out what it asks for (datagrams to send, packets to deliver). The one
//! exception to time injection is boringtun's `Tunn`, which reads the monotonic clock itself.

pub mod address;
pub mod demand;
pub mod demux;
pub mod engine;
mod ice;
pub mod key;
pub mod node;
pub mod osn;
pub mod packet;
pub mod peer_relay;
pub mod plan;
pub mod punch;
pub mod route;
pub mod stun;
#[cfg(test)]
mod testing;
pub mod translate;
pub mod turn;

pub use demand::LinkPolicy;
pub use engine::{
    Engine, ExitChoice, ExitStatus, LinkPhase, LinkStatus, RouteState, RouteStatus, Unlinked,
    UnlinkedReason,
};
pub use key::{KeyError, PublicKey};
pub use node::{
    Destinations, DropReason, Drops, LinkState, Mapping, Node, PeerConfig, PeerStatus, Problem,
    Transmit, Unsent,
};
pub use plan::{EngineEvent, Memory, OverlayConfig, OwnAddresses};
