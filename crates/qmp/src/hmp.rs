//! The human monitor on a terminal (`--monitor stdio`) or a unix socket.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use crate::dispatch::{Dispatcher, Session};

/// Runs the HMP prompt on stdin/stdout until end of input or `quit`.
pub fn run_stdio(dispatcher: Arc<Dispatcher>) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut out = std::io::stdout();
        let _ = write!(out, "{}\n(qemu) ", vmigrate_hmp::BANNER);
        let _ = out.flush();
        let mut session = Session::default();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let text = dispatcher.human_monitor_command(&line, &mut session);
            let _ = write!(out, "{text}(qemu) ");
            let _ = out.flush();
            session.run_after_reply();
            if session.quit {
                std::process::exit(0);
            }
        }
    });
}

/// Serves HMP on a unix socket, one thread per client, lines ending in CRLF.
pub fn serve_unix(path: &str, dispatcher: Arc<Dispatcher>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let d = dispatcher.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                let _ = write!(w, "{}\r\n(qemu) ", vmigrate_hmp::BANNER);
                let mut session = Session::default();
                for line in std::io::BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    let text = d.human_monitor_command(line.trim_end_matches('\r'), &mut session);
                    let _ = write!(w, "{}(qemu) ", text.replace('\n', "\r\n"));
                    session.run_after_reply();
                    if session.quit {
                        std::process::exit(0);
                    }
                }
            });
        }
    });
    Ok(())
}
