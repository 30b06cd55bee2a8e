#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| epp::fuzz::ext_proc_stream(data));
