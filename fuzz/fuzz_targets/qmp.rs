//! QMP framing (split into JSON values, with the size cap), then each message's
//! argument checking and dispatch for the commands that stay inside the process.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate_fuzz::{dispatcher, safe_command};
use vmigrate_qmp::dispatch::Session;
use vmigrate_qmp::framing::{Frame, Framer};

fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::default();
    let mut frames = Vec::new();
    // In two reads, as a client's bytes may arrive.
    let cut = data.len() / 2;
    framer.push(&data[..cut], &mut frames);
    framer.push(&data[cut..], &mut frames);
    let d = dispatcher();
    let mut session = Session::default();
    for frame in frames {
        let Frame::Message(text) = frame else {
            continue;
        };
        let Ok(serde_json::Value::Object(msg)) = serde_json::from_str::<serde_json::Value>(&text)
        else {
            continue;
        };
        let Some(name) = msg
            .get("execute")
            .or_else(|| msg.get("exec-oob"))
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        if !safe_command(name) {
            continue;
        }
        let args = match msg.get("arguments") {
            Some(serde_json::Value::Object(a)) => a.clone(),
            _ => Default::default(),
        };
        let _ = d.execute(name, &args, &mut session);
        session.run_after_reply();
    }
});
