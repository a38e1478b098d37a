//! The VM run state, with QEMU's `STOP` and `RESUME` events.

use std::sync::{Arc, Mutex};

use vmigrate_engine::{EventBus, RunState, VmControl, VmmError};

use crate::gate::VcpuGate;

/// Run control for machines whose vCPUs (if any) follow this state.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<RunState>,
    events: Arc<EventBus>,
    /// The vCPUs that run while the state is `running` (none on the `none` machine).
    vcpus: Option<Arc<VcpuGate>>,
}

impl RunControl {
    pub fn new(initial: RunState, events: Arc<EventBus>) -> Self {
        Self {
            state: Mutex::new(initial),
            events,
            vcpus: None,
        }
    }

    /// Run control that also parks and resumes vCPUs; they run now if `initial` does.
    pub fn with_vcpus(initial: RunState, events: Arc<EventBus>, vcpus: Arc<VcpuGate>) -> Self {
        if initial.is_running() {
            vcpus.resume();
        }
        Self {
            state: Mutex::new(initial),
            events,
            vcpus: Some(vcpus),
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
        if let Some(v) = &self.vcpus {
            // Returns once no vCPU runs guest code any more.
            v.pause();
        }
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
        if let Some(v) = &self.vcpus {
            v.resume();
        }
        drop(st);
        if !was_running {
            self.events.emit("RESUME", None);
        }
    }

    fn set_run_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn set_cpu_throttle(&self, percentage: u8) -> Result<(), VmmError> {
        match &self.vcpus {
            Some(v) => {
                v.set_throttle(percentage);
                Ok(())
            }
            None if percentage == 0 => Ok(()),
            None => Err(VmmError::Other(
                "this machine has no vCPUs to throttle".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_start_drive_the_vcpus() {
        let gate = Arc::new(VcpuGate::new());
        let rc = RunControl::with_vcpus(RunState::Running, EventBus::new(), gate.clone());
        assert!(gate.running());
        rc.vm_stop(RunState::FinishMigrate);
        assert!(!gate.running());
        assert_eq!(rc.run_state(), RunState::FinishMigrate);
        rc.vm_start();
        assert!(gate.running());
        rc.set_cpu_throttle(30).unwrap();
        assert_eq!(gate.throttle(), 30);
        let plain = RunControl::new(RunState::Running, EventBus::new());
        assert!(plain.set_cpu_throttle(0).is_ok());
        assert!(plain.set_cpu_throttle(20).is_err());
    }
}
