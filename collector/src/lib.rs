//! voltail: one process that collects the log files of every pod on a shared volume.
//!
//! The path of a line, left to right through the modules:
//! [`discovery`] finds files by glob -> [`identity`] says who each file is -> [`tail`] polls and
//! reads them through a [`tail::backend::ReadBackend`] -> [`framing`] cuts lines and multiline
//! events -> [`tags`] names them from the path (and from the writer's cgroup, which [`probe`]
//! sees and [`cgroup`] resolves) -> [`batch`] encodes and compresses ->
//! [`sink`] delivers -> [`uploader`] turns acknowledgements into the [`checkpoint`].
//! [`daemon`] wires the threads and queues; [`lock`] keeps one owner per `data_dir`;
//! [`metrics`] is the events interface and the Prometheus endpoint; [`lag`] joins what is read
//! with what is acknowledged; [`config`] describes it all; [`report`] prints the checkpoint;
//! [`generate`] writes demo load.

pub mod batch;
pub mod cgroup;
pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod escape;
pub mod framing;
pub mod generate;
pub mod handover;
pub mod identity;
pub mod lag;
pub mod lock;
pub mod metrics;
pub mod par;
pub mod probe;
pub mod report;
pub mod sink;
pub mod tags;
pub mod tail;
pub mod uploader;

/// A hash map for keys that are ours or the kernel's (file keys, inode numbers), never names
/// a pod chose (xxh3's seed is fixed, so collisions could be crafted): looked up per due file,
/// per probe event and per ack, where SipHash showed in the W3-with-probe profile.
pub type FastMap<K, V> = std::collections::HashMap<K, V, xxhash_rust::xxh3::Xxh3DefaultBuilder>;
