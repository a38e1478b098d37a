//! The return path as the source reads it: PONG, SHUT, SWITCHOVER_ACK, page requests
//! (postcopy), RECV_BITMAP with its bitmap and RESUME_ACK (recovery).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmigrate_engine::channels::ReturnPath;
use vmigrate_fuzz::memfd;
use vmigrate_stream::return_path::RpMessage;
use vmigrate_stream::SliceSource;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // The codec alone, message after message.
    let mut src = SliceSource::new(rest);
    while let Ok(msg) = RpMessage::decode(&mut src) {
        let mut out = Vec::new();
        msg.encode(&mut out);
    }
    // The source's reader thread, as in a recovery or a plain postcopy.
    let rp = if sel & 1 != 0 {
        ReturnPath::spawn_for_recovery(
            memfd(rest),
            vec![("m0".into(), 2048), ("pc.ram".into(), 2048)],
        )
    } else {
        ReturnPath::spawn(memfd(rest), sel & 2 != 0)
    };
    let r = rp.await_close(Duration::from_secs(10));
    assert!(
        !matches!(
            r,
            Err(vmigrate_engine::channels::ReturnPathError::CloseTimeout)
        ),
        "the return path reader did not end at the end of its input"
    );
    while rp.next_page_request().is_some() {}
    let _ = rp.error().map(|e| e.to_string());
});
