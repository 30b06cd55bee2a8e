//! Simulation: a vLLM-like engine model ([`engine`]), the simulator's tokenizer ([`tokens`]),
//! workloads ([`workload`]), the discrete-event fleet simulator ([`fleet`]) that drives epp's
//! own scheduler, and reporting ([`report`]). The `epp-sim` binary serves the engine over HTTP
//! in real time; `epp-fleet` runs the fleet simulator.

pub mod engine;
pub mod fleet;
pub mod report;
pub mod tokens;
pub mod workload;
