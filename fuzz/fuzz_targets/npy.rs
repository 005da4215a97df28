#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| t2i_rt_fuzz::targets::npy(data));
