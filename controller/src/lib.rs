//! The Flotilla controller: HTTP API, store, control loop and embedded MQTT
//! broker, and the kubectl-shaped CLI that talks to the API.

pub mod api;
pub mod auth;
pub mod broker;
pub mod broker_config;
pub mod cli;
pub mod client;
pub mod control;
pub mod exec;
pub mod fleet;
pub mod identity;
pub mod manifest;
pub mod mqtt;
pub mod output;
pub mod rollout;
pub mod rpc;
pub mod scheduler;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod up;
pub mod view;
