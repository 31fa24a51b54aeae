//! voltail: one process that collects the log files of every pod on a shared volume.
//!
//! The path of a line, left to right through the modules:
//! [`discovery`] finds files by glob -> [`identity`] says who each file is -> [`tail`] polls and
//! reads them through a [`tail::backend::ReadBackend`] -> [`framing`] cuts lines and multiline
//! events -> [`tags`] names them from the path -> [`batch`] encodes and compresses ->
//! [`sink`] delivers -> [`uploader`] turns acknowledgements into the [`checkpoint`].
//! [`daemon`] wires the threads and queues; [`lock`] keeps one owner per `data_dir`;
//! [`metrics`] is the events interface and the Prometheus endpoint; [`config`] describes it all.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod identity;
pub mod probe;
pub mod sink;
pub mod tail;
