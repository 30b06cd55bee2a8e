#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| epp::fuzz::grpc_stream(data));
