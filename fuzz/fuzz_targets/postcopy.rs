//! Postcopy's messages: ADVISE and RAM_DISCARD payloads, the received-pages bitmap of
//! a recovery (RECV_BITMAP), preempt-channel records, and main-stream commands.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate_stream::postcopy::{PostcopyAdvise, RamDiscard};
use vmigrate_stream::recover::RecvBitmap;
use vmigrate_stream::{command, preempt, SliceSource};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Ok(a) = PostcopyAdvise::decode(rest, 0) {
                let _ = a.encode();
            }
        }
        1 => {
            if let Ok(d) = RamDiscard::decode(rest, 0) {
                let _ = d.encode();
            }
        }
        2 => {
            let mut src = SliceSource::new(rest);
            let pages = u64::from(rest.first().copied().unwrap_or(0)) * 97;
            if let Ok(b) = RecvBitmap::decode_body(&mut src, "m0", pages) {
                let _ = b.count();
            }
        }
        3 => {
            let mut src = SliceSource::new(rest);
            while let Ok(Some(_)) = preempt::decode_record(&mut src, 4096) {}
        }
        _ => {
            let mut src = SliceSource::new(rest);
            while let Ok(c) = command::decode_after_tag(&mut src, 0) {
                let _ = format!("{c:?}");
            }
        }
    }
});
