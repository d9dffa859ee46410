//! The frame decoder takes arbitrary bytes, split into arbitrary reads, without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| replicator::fuzzing::decode(data));
