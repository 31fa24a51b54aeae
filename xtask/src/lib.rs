//! The part of xtask that other crates use: the slow-NAS FUSE stand-in ([`slownas`]) with its
//! fault injection ([`slownas::faults`]), which the integration tests mount to put the real
//! collector through EIO, ESTALE and vanishing directories. The rest of xtask (bench, soak)
//! lives in the binary.

pub mod slownas;
