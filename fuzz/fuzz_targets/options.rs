//! Command-line and monitor options that come from outside: `--object` option text and
//! the object it adds, `--global migration.*`, migration URIs, the `channels` argument,
//! sizes, capabilities and parameters. The first byte picks the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate_engine::channels::{parse_object_option, parse_size, Address, ObjectStore};
use vmigrate_engine::options::{Capabilities, Parameters};
use vmigrate_engine::{MigrationProperties, Migrator};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match sel % 7 {
        0 => {
            if let Ok(props) = parse_object_option(text) {
                // Only objects that read no files: credentials name a directory.
                if props.get("dir").is_none() {
                    let store = ObjectStore::default();
                    let _ = store.add(&props, false);
                    let _ = store.list();
                }
            }
        }
        1 => {
            let mut p = MigrationProperties::default();
            let _ = p.apply_global(text);
        }
        2 => {
            let _ = Address::parse_uri(text);
            let _ = Migrator::parse_target(Some(text), None, sel & 8 != 0);
        }
        3 => {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
                let _ = Migrator::parse_target(None, Some(&v), sel & 8 != 0);
                let _ = Address::from_json(&v, "channels[0].addr");
            }
        }
        4 => {
            let _ = parse_size(text);
        }
        5 => {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
                let _ = Capabilities::default().merged(&v, sel & 8 != 0, &Parameters::default());
            }
        }
        _ => {
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(text) {
                if let Ok(p) = Parameters::default().merged(&o) {
                    let _ = p.cross_check(&Parameters::default(), &Capabilities::default());
                }
            }
        }
    }
});
