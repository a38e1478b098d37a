//! Events the engine and the VM raise (`MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`),
//! delivered to whoever subscribed (the QMP server).

use std::sync::{Arc, Mutex};

use serde_json::Value;

type Subscriber = Box<dyn Fn(&str, Option<&Value>) + Send + Sync>;

/// A fan-out of events to subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Subscriber>>,
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
}
