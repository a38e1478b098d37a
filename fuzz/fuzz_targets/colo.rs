//! COLO's checkpoint messages as either side reads them: a message, or VMSTATE_SIZE
//! with its be64 size (capped), one after the other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate_stream::colo::ColoMessage;
use vmigrate_stream::{SliceSource, Source};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut src = SliceSource::new(rest);
    let mut i = 0;
    loop {
        let at = src.offset() as usize;
        let read = if (sel >> (i % 8)) & 1 != 0 {
            ColoMessage::decode_size(&mut src, 1 << 26).map(|size| {
                let mut out = Vec::new();
                ColoMessage::encode_size(&mut out, size);
                out
            })
        } else {
            ColoMessage::decode(&mut src).map(|m| {
                let mut out = Vec::new();
                m.encode(&mut out);
                out
            })
        };
        let Ok(out) = read else {
            break;
        };
        assert_eq!(
            out,
            rest[at..src.offset() as usize],
            "a message does not encode back"
        );
        i += 1;
    }
});
