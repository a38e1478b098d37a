//! Events the engine and the VM raise (`MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`),
//! delivered to whoever subscribed (the QMP server), and warnings: what QEMU would print
//! on stderr without failing (a deprecated capability, a refused TLS client, an odd
//! trailer). The library never prints; the program decides where warnings go.

use std::sync::{Arc, Mutex};

use serde_json::Value;

type Subscriber = Box<dyn Fn(&str, Option<&Value>) + Send + Sync>;
type WarningSink = Box<dyn Fn(&str) + Send + Sync>;

/// A fan-out of events to subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Subscriber>>,
    warning_sinks: Mutex<Vec<WarningSink>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").finish_non_exhaustive()
    }
}

impl EventBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn subscribe(&self, f: impl Fn(&str, Option<&Value>) + Send + Sync + 'static) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    pub fn emit(&self, name: &str, data: Option<Value>) {
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for s in subs.iter() {
            s(name, data.as_ref());
        }
    }

    /// Adds a receiver of warnings (the `vmigrate` program prints them on stderr).
    pub fn on_warning(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        self.warning_sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// Reports a warning to every receiver; with none, it is dropped.
    pub fn warn(&self, msg: &str) {
        let sinks = self.warning_sinks.lock().unwrap_or_else(|e| e.into_inner());
        for s in sinks.iter() {
            s(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_reach_every_sink_and_events_do_not() {
        let bus = EventBus::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.on_warning(move |m| s.lock().unwrap().push(m.to_string()));
        bus.emit("STOP", None);
        bus.warn("zero-blocks capability is deprecated");
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["zero-blocks capability is deprecated"]
        );
        EventBus::new().warn("nobody listens: dropped");
    }
}
