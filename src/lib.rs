//! epp: an Endpoint Picker for LLM inference gateways.
//!
//! Envoy calls epp over ext_proc for every request; epp parses the OpenAI-style body, hashes the
//! prompt into prefix blocks, scores every model-server endpoint (prefix-cache affinity, queue
//! depth, KV-cache use, LoRA), picks one and tells Envoy where to send the request. The modules
//! follow that path: [`extproc`] → [`request`] → [`director`] → [`scheduling`] (with [`index`])
//! over the [`datastore`], which [`discovery`] and [`scrape`] keep current.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod config;
pub mod datastore;
pub mod director;
pub mod discovery;
pub mod duration;
pub mod extproc;
pub mod fuzz;
pub mod index;
pub mod leader;
pub mod objectives;
pub mod request;
pub mod scheduling;
pub mod scrape;
pub mod sim;
pub mod telemetry;
pub mod tls;
