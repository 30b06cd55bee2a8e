#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| epp::fuzz::body_scanner(data));
