//! The subject DN of a peer's certificate (DER), as TLS authorization reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmigrate_engine::channels::subject_dn(data);
});
