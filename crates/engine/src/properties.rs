//! The migration object's properties: settings fixed for the life of the process, which
//! QEMU users give on the command line as `-global migration.PROPERTY=VALUE`.

/// Where multifd sync points go and what marks them on the main stream (see
/// [`MigrationProperties::multifd_flush_after_each_section`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MultifdSync {
    /// In RAM setup and each time the page scan wraps past the last RAM block, each
    /// marked by a MULTIFD_FLUSH record.
    #[default]
    PerRound,
    /// In RAM setup and before every RAM EOS; the EOS is the marker, and no
    /// MULTIFD_FLUSH record is written.
    PerSection,
}

/// The migration object's properties that vmigrate implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationProperties {
    /// `multifd-flush-after-each-section` (default off): multifd syncs once per RAM
    /// section instead of once per pass over RAM. Both ends must agree, since the
    /// destination treats every RAM EOS as a sync point only when it is on.
    pub multifd_flush_after_each_section: bool,
}

/// Why a `-global` setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobalError {
    #[error("-global {0}: Invalid parameter '{0}' (expected DRIVER.PROPERTY=VALUE)")]
    Syntax(String),
    #[error(
        "global {driver}.{property} has invalid class name '{driver}' (vmigrate knows: migration)"
    )]
    UnknownDriver { driver: String, property: String },
    #[error(
        "can't apply global migration.{property}={value}: Property 'migration.{property}' not found \
         (vmigrate knows: {known})"
    )]
    UnknownProperty {
        property: String,
        value: String,
        known: String,
    },
    #[error(
        "can't apply global migration.{property}={value}: Parameter '{property}' expects 'on' or 'off'"
    )]
    NotBool { property: String, value: String },
}

/// The properties [`MigrationProperties::apply_global`] accepts.
pub const PROPERTIES: [&str; 1] = ["multifd-flush-after-each-section"];

impl MigrationProperties {
    /// Applies one `DRIVER.PROPERTY=VALUE` setting, as QEMU's `-global` takes it.
    /// Booleans accept `on`/`yes`/`true`/`y` and `off`/`no`/`false`/`n`.
    pub fn apply_global(&mut self, spec: &str) -> Result<(), GlobalError> {
        let syntax = || GlobalError::Syntax(spec.to_string());
        let (target, value) = spec.split_once('=').ok_or_else(syntax)?;
        let (driver, property) = target.split_once('.').ok_or_else(syntax)?;
        if driver.is_empty() || property.is_empty() {
            return Err(syntax());
        }
        if driver != "migration" {
            return Err(GlobalError::UnknownDriver {
                driver: driver.to_string(),
                property: property.to_string(),
            });
        }
        let slot = match property {
            "multifd-flush-after-each-section" => &mut self.multifd_flush_after_each_section,
            _ => {
                return Err(GlobalError::UnknownProperty {
                    property: property.to_string(),
                    value: value.to_string(),
                    known: PROPERTIES.join(", "),
                })
            }
        };
        *slot = parse_bool(value).ok_or_else(|| GlobalError::NotBool {
            property: property.to_string(),
            value: value.to_string(),
        })?;
        Ok(())
    }

    /// The multifd sync placement these properties select.
    pub fn multifd_sync(&self) -> MultifdSync {
        if self.multifd_flush_after_each_section {
            MultifdSync::PerSection
        } else {
            MultifdSync::PerRound
        }
    }
}

/// A boolean property value, spelled as QEMU accepts it (case matters).
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(spec: &str) -> Result<MigrationProperties, GlobalError> {
        let mut p = MigrationProperties::default();
        p.apply_global(spec).map(|()| p)
    }

    #[test]
    fn default_is_per_round() {
        let p = MigrationProperties::default();
        assert!(!p.multifd_flush_after_each_section);
        assert_eq!(p.multifd_sync(), MultifdSync::PerRound);
    }

    #[test]
    fn flush_after_each_section_takes_every_bool_spelling() {
        for v in ["on", "yes", "true", "y"] {
            let p = apply(&format!("migration.multifd-flush-after-each-section={v}")).unwrap();
            assert_eq!(p.multifd_sync(), MultifdSync::PerSection, "{v}");
        }
        for v in ["off", "no", "false", "n"] {
            let mut p = MigrationProperties {
                multifd_flush_after_each_section: true,
            };
            p.apply_global(&format!("migration.multifd-flush-after-each-section={v}"))
                .unwrap();
            assert_eq!(p.multifd_sync(), MultifdSync::PerRound, "{v}");
        }
    }

    #[test]
    fn bad_values_and_names_are_refused_with_the_name() {
        let e = apply("migration.multifd-flush-after-each-section=ON").unwrap_err();
        assert_eq!(
            e.to_string(),
            "can't apply global migration.multifd-flush-after-each-section=ON: \
             Parameter 'multifd-flush-after-each-section' expects 'on' or 'off'"
        );
        for v in ["1", "0", ""] {
            let spec = format!("migration.multifd-flush-after-each-section={v}");
            assert!(
                matches!(apply(&spec), Err(GlobalError::NotBool { .. })),
                "{v}"
            );
        }
        let e = apply("migration.nonexistent=on").unwrap_err().to_string();
        assert!(
            e.contains("Property 'migration.nonexistent' not found"),
            "{e}"
        );
        assert!(e.contains("multifd-flush-after-each-section"), "{e}");
        let e = apply("foo.bar=on").unwrap_err().to_string();
        assert!(e.contains("invalid class name 'foo'"), "{e}");
        for spec in ["badformat", "migration=on", "migration.=on", ".x=on"] {
            assert!(matches!(apply(spec), Err(GlobalError::Syntax(_))), "{spec}");
        }
    }
}
