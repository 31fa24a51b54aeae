//! The config parser on arbitrary text: returns a config or an error, never panics; what
//! parses prints (`voltail check`) without panicking too, and what it prints parses again.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use voltail::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::parse(Path::new("fuzz.toml"), text) {
        let printed = cfg.to_toml();
        if let Err(e) = Config::parse(Path::new("printed.toml"), &printed) {
            panic!("printed config does not parse: {e}\n{printed}");
        }
    }
});
