//! Integration tests: one test binary, one module per area.

mod collector;
mod probe;
mod shard;
