//! A multifd channel as the destination reads it: the handshake (init packet), then
//! packets with their page offsets and payloads, uncompressed, zlib or zstd (first
//! byte).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmigrate_engine::compress::Method;
use vmigrate_engine::incoming::{read_init, ReceivedPages};
use vmigrate_engine::incoming::{MultifdReceiver, ReceiveConfig};
use vmigrate_engine::Vmm;
use vmigrate_fuzz::{memfd, vm};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let method = match sel % 3 {
        1 => Method::Zlib,
        2 => Method::Zstd,
        _ => Method::None,
    };
    let fd = memfd(rest);
    if read_init(&fd, [0; 16], 2).is_err() {
        return;
    }
    let vm = vm();
    let blocks = vm.ram_blocks().to_vec();
    let receiver = MultifdReceiver::start(
        vec![fd],
        ReceiveConfig {
            pristine: vec![false; blocks.len()],
            received: Arc::new(ReceivedPages::new(&blocks)),
            blocks,
            method,
            page_size: 4096,
        },
    );
    // The main stream's part: release each SYNC until the channel ends.
    while receiver.wait_sync().is_ok() {}
    let _ = receiver.finish();
    if let Some(e) = receiver.failure() {
        let _ = e.to_string();
    }
});
