//! A presented key, any text at all: rejected with a reason, or a key that parses back to itself. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_shared::key::ApiKey;

fuzz_target!(|presented: &str| {
    if let Ok(key) = ApiKey::parse(presented) {
        assert_eq!(ApiKey::parse(key.expose()), Ok(key.clone()));
        key.hash();
    }
});
