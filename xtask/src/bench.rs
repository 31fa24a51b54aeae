//! placeholder
/// Bench arguments.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}
/// Runs the bench.
pub fn run(_a: BenchArgs) -> anyhow::Result<()> { Ok(()) }
