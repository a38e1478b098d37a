//! A mapped-ram file (`file:` migration with the mapped-ram capability): its header,
//! per-block headers, bitmaps and page offsets, read from a seekable descriptor. The
//! first byte picks multifd (parallel readers) and the reader count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate_engine::incoming::{load_stream_with, MappedRamLoad};
use vmigrate_engine::options::{Capabilities, Parameters};
use vmigrate_engine::{RunState, Vmm};
use vmigrate_fuzz::{memfd, vm};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut list = vec![serde_json::json!({"capability": "mapped-ram", "state": true})];
    if sel & 1 != 0 {
        list.push(serde_json::json!({"capability": "multifd", "state": true}));
    }
    let Ok(caps) = Capabilities::default().merged(
        &serde_json::Value::Array(list),
        false,
        &Parameters::default(),
    ) else {
        return;
    };
    let vm = vm();
    vm.control().set_run_state(RunState::InMigrate);
    let how = MappedRamLoad {
        threads: usize::from((sel >> 1) & 3) + 1,
        direct_io: false,
    };
    let mut src = vmigrate_engine::io::FdSource::new(memfd(rest), 0);
    if let Err(e) = load_stream_with(&mut src, &*vm, &caps, None, None, how) {
        let _ = e.to_string();
    }
});
