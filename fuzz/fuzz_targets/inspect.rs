//! The inspector's walk over a stream file, and its text and JSON reports.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let report = vmigrate_inspect::inspect(data, 0);
    let _ = format!("{report:?}");
});
