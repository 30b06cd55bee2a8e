//! Simulation: the simulator's own language, tokenizer and chat template ([`text`],
//! [`tokenizer`]), a vLLM-like engine model ([`engine`]), workloads ([`workload`]), the
//! discrete-event fleet simulator ([`fleet`]) that drives epp's own scheduler next to peer
//! routers' policies ([`peers`]), and reporting ([`report`]). The `epp-sim` binary serves the
//! engine over HTTP in real time; `epp-fleet` runs the fleet simulator.

pub mod engine;
pub mod fleet;
pub mod peers;
pub mod report;
pub mod text;
pub mod tokenizer;
pub mod workload;
