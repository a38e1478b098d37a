//! The whole main-stream load into an in-memory VMM: header, configuration, sections,
//! vmstate, RAM records, commands, vmdesc. The first byte picks the capabilities and
//! whether a return path is open; with multifd, the rest is split into the main stream
//! and one channel's packets (after its handshake).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate_engine::channels::ReturnPathWriter;
use vmigrate_engine::compress::Method;
use vmigrate_engine::incoming::{load_stream_with, MappedRamLoad, MultifdChannels};
use vmigrate_engine::options::{Capabilities, Parameters};
use vmigrate_engine::{MultifdSync, RunState, Vmm};
use vmigrate_fuzz::{memfd, split, vm};
use vmigrate_stream::source::Source as _;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut names = Vec::new();
    if sel & 2 != 0 {
        names.push("postcopy-ram");
    }
    if sel & 4 != 0 {
        names.push("x-ignore-shared");
    }
    if sel & 8 != 0 {
        names.push("validate-uuid");
    }
    let multifd = sel & 16 != 0;
    if multifd {
        names.push("multifd");
    }
    let list: Vec<_> = names
        .iter()
        .map(|n| serde_json::json!({"capability": n, "state": true}))
        .collect();
    let caps = Capabilities::default()
        .merged(
            &serde_json::Value::Array(list),
            false,
            &Parameters::default(),
        )
        .unwrap_or_default();
    let vm = vm();
    vm.control().set_run_state(RunState::InMigrate);
    let rp = (sel & 1 != 0).then(|| ReturnPathWriter::new(Box::new(std::io::sink())));
    let (main, channels) = if multifd {
        let (main, chan) = split(rest);
        let method = match sel >> 6 {
            1 => Method::Zlib,
            2 => Method::Zstd,
            _ => Method::None,
        };
        let sync = if sel & 32 != 0 {
            MultifdSync::PerSection
        } else {
            MultifdSync::PerRound
        };
        let fd = memfd(chan);
        if vmigrate_engine::incoming::read_init(&fd, [0; 16], 1).is_err() {
            return;
        }
        (
            main,
            Some(MultifdChannels {
                fds: vec![fd],
                method,
                sync,
            }),
        )
    } else {
        (rest, None)
    };
    let mut src = vmigrate_engine::io::FdSource::new(memfd(main), 0);
    if let Err(e) = load_stream_with(
        &mut src,
        &*vm,
        &caps,
        rp,
        channels,
        MappedRamLoad::default(),
    ) {
        let _ = e.to_string();
    }
    let _ = src.offset();
});
