//! The VM run state, with QEMU's `STOP` and `RESUME` events.

use std::sync::{Arc, Mutex};

use vmigrate_engine::{EventBus, RunState, VmControl};

/// Run control for machines whose vCPUs (if any) follow this state.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<RunState>,
    events: Arc<EventBus>,
}

impl RunControl {
    pub fn new(initial: RunState, events: Arc<EventBus>) -> Self {
        Self {
            state: Mutex::new(initial),
            events,
        }
    }
}

impl VmControl for RunControl {
    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm_stop(&self, state: RunState) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let was_running = st.is_running();
        *st = state;
        drop(st);
        if was_running {
            self.events.emit("STOP", None);
        }
    }

    fn vm_start(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let was_running = st.is_running();
        *st = RunState::Running;
        drop(st);
        if !was_running {
            self.events.emit("RESUME", None);
        }
    }

    fn set_run_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}
