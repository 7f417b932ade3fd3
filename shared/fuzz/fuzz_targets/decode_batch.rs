//! A usage message off NATS, any bytes at all: rejected with a reason, or decoded to events that encode and decode
//! back to themselves. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_shared::codec::{decode_batch, encode_batch};

fuzz_target!(|message: &[u8]| {
    if let Ok(events) = decode_batch(message) {
        assert_eq!(decode_batch(&encode_batch(events.clone())), Ok(events));
    }
});
