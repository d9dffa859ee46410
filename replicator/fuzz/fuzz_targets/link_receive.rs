//! A link's receive path (handshake, decode, session) takes arbitrary peer bytes without
//! panicking or growing without bound.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| replicator::fuzzing::receive(data));
