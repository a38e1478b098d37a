//! Migration blockers: reasons an outgoing migration is refused, each registered for
//! one migration mode or for all of them, as QEMU registers its blockers.

use std::sync::Mutex;

use vmigrate_engine::MigMode;

/// The blockers of one VM, in registration order.
#[derive(Debug, Default)]
pub struct MigrationBlockers {
    /// `None`: the blocker applies in every mode.
    entries: Mutex<Vec<(Option<MigMode>, String)>>,
}

impl MigrationBlockers {
    /// Registers `reason` for `mode`, or for every mode when `mode` is `None`.
    pub fn add(&self, mode: Option<MigMode>, reason: impl Into<String>) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((mode, reason.into()));
    }

    /// The reasons that block a migration in `mode`, oldest first.
    pub fn for_mode(&self, mode: MigMode) -> Vec<String> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(m, _)| m.is_none_or(|m| m == mode))
            .map(|(_, reason)| reason.clone())
            .collect()
    }
}

/// QEMU's `cpr-transfer` blocker for guest RAM that another process cannot map (not a
/// shared file), naming the RAM block.
pub fn cpr_ram_blocker(region: &str) -> String {
    format!(
        "Memory region {region} is not compatible with CPR. share=on is required for \
         memory-backend objects, and aux-ram-share=on is required."
    )
}

/// Parses a `MODE:TEXT` blocker specification; MODE is a migration mode or `all`.
pub fn parse_blocker_spec(spec: &str) -> Result<(Option<MigMode>, String), String> {
    let (mode, text) = spec
        .split_once(':')
        .ok_or_else(|| format!("'{spec}' is not MODE:TEXT"))?;
    let mode = match mode {
        "all" => None,
        name => Some(MigMode::from_name(name).ok_or_else(|| {
            format!(
                "unknown migration mode '{name}' (known: all, normal, cpr-reboot, cpr-transfer)"
            )
        })?),
    };
    if text.is_empty() {
        return Err("the blocker text is empty".into());
    }
    Ok((mode, text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockers_apply_to_their_mode_in_registration_order() {
        let b = MigrationBlockers::default();
        b.add(Some(MigMode::CprTransfer), cpr_ram_blocker("ram"));
        b.add(None, "everywhere");
        b.add(Some(MigMode::CprReboot), "reboot only");
        assert_eq!(b.for_mode(MigMode::Normal), ["everywhere"]);
        assert_eq!(
            b.for_mode(MigMode::CprReboot),
            ["everywhere", "reboot only"]
        );
        assert_eq!(
            b.for_mode(MigMode::CprTransfer),
            [
                "Memory region ram is not compatible with CPR. share=on is required for \
                 memory-backend objects, and aux-ram-share=on is required.",
                "everywhere"
            ]
        );
    }

    #[test]
    fn blocker_specs() {
        assert_eq!(
            parse_blocker_spec("cpr-reboot:no: not now"),
            Ok((Some(MigMode::CprReboot), "no: not now".to_string()))
        );
        assert_eq!(parse_blocker_spec("all:x"), Ok((None, "x".to_string())));
        assert!(parse_blocker_spec("cpr-exec:x").is_err());
        assert!(parse_blocker_spec("normal:").is_err());
        assert!(parse_blocker_spec("normal").is_err());
    }
}
