//! Helpers shared by Flotilla's end-to-end tests and by other crates' tests.

pub mod machine;
pub mod oci;
pub mod registry;
