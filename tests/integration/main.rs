mod shard;
