//! Prints the report for one file: `inspect_file FILE [--json] [--offset N] [--no-header]`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut path = None;
    let mut json = false;
    let mut options = vmigrate_inspect::Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--no-header" => options.headerless = true,
            "--offset" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => options.stream_offset = n,
                None => {
                    eprintln!("--offset needs a number");
                    return ExitCode::from(2);
                }
            },
            _ => path = Some(a),
        }
    }
    let Some(path) = path else {
        eprintln!("usage: inspect_file FILE [--json] [--offset N] [--no-header]");
        return ExitCode::from(2);
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(2);
        }
    };
    let report = vmigrate_inspect::inspect_with(&data, &options);
    if json {
        println!("{:#}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if report.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
