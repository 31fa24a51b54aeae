//! The checkpoint loader on arbitrary bytes: never panics, and a file that loads once loads
//! the same after `Store::open` moved it aside or rewrote it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voltail::checkpoint::{self, LoadOutcome};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(checkpoint::FILE_NAME), data).expect("write");
    let ro = checkpoint::read_only(dir.path()).expect("read_only never fails on content");
    let (mut store, loaded) = checkpoint::Store::open(dir.path()).expect("open");
    assert_eq!(ro.entries, loaded.entries);
    assert_eq!(ro.outcome, loaded.outcome);
    // What loaded is written back and loads cleanly.
    let mut state = checkpoint::State::default();
    for (i, e) in loaded.entries.iter().enumerate() {
        state.entries.insert(i as u64, e.clone());
    }
    state.cursor = loaded.cursor.clone().unwrap_or_default();
    store.write(&state).expect("write");
    drop(store);
    let again = checkpoint::read_only(dir.path()).expect("read back");
    assert!(
        matches!(again.outcome, LoadOutcome::Clean { .. }),
        "{:?}",
        again.outcome
    );
    let sorted = |v: &[checkpoint::Entry]| {
        let mut v: Vec<String> = v.iter().map(|e| format!("{e:?}")).collect();
        v.sort();
        v
    };
    assert_eq!(sorted(&again.entries), sorted(&loaded.entries));
});
