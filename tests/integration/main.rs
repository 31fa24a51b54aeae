//! Integration tests: one test binary, one module per area.

mod collector;
mod faults;
mod probe;
mod shard;
mod sinks;
mod soak;
