//! The guest clock, migrated as QEMU's `timer` section (version 2).

use std::sync::Mutex;

use vmigrate_engine::vmm::{DeviceLoadError, DeviceState, VmmError};
use vmigrate_stream::devices::{TimerState, TIMER_IDSTR, TIMER_MIN_VERSION, TIMER_VERSION};
use vmigrate_stream::Source;

/// The clock offsets; a `none` machine has no vCPU clock to run, so they are carried
/// as received.
#[derive(Debug, Default)]
pub struct GuestClock {
    state: Mutex<TimerState>,
}

impl GuestClock {
    pub fn state(&self) -> TimerState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DeviceState for GuestClock {
    fn idstr(&self) -> &str {
        TIMER_IDSTR
    }
    fn version(&self) -> u32 {
        TIMER_VERSION
    }
    fn minimum_version(&self) -> u32 {
        TIMER_MIN_VERSION
    }
    fn save(&self) -> Result<Vec<u8>, VmmError> {
        Ok(self.state().encode())
    }
    fn load(&self, mut src: &mut dyn Source, version: u32) -> Result<(), DeviceLoadError> {
        let s = TimerState::decode(&mut src, version)?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        Ok(())
    }
    fn describe(&self) -> serde_json::Value {
        TimerState::describe()
    }
}
