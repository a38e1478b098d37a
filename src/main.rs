//! `vmigrate`: the reference VM with a QEMU-compatible monitor, the migration-file
//! inspector, and a demo.

mod demo;
mod qmp_client;
mod report;
mod vm;
mod vm_cpr;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vmigrate",
    version,
    about = "QEMU-compatible live migration in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a reference VM with a QMP (and optionally HMP) monitor.
    Vm(Box<vm::VmArgs>),
    /// Read a migration file (QEMU's or vmigrate's) and report what it holds.
    Inspect {
        file: std::path::PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Byte offset where the stream starts (for `file:PATH,offset=N` files).
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Migrate a VM between two local processes and show it arrive intact.
    Demo(demo::DemoArgs),
    /// Render a migration's timeline as an HTML page with SVG charts.
    Report(ReportArgs),
    /// Rewrite a migration file of any machine as mapped-ram or as a plain stream.
    Convert {
        input: std::path::PathBuf,
        output: std::path::PathBuf,
        /// Layout of the output file.
        #[arg(long, value_enum)]
        to: ConvertTo,
    },
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["timeline", "qmp"])))]
struct ReportArgs {
    /// A timeline saved from `x-vmigrate-query-migrate-timeline` (JSON; `-` reads stdin).
    timeline: Option<std::path::PathBuf>,
    /// Read the timeline of the last outgoing migration from this QMP socket instead.
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// Where to write the HTML page.
    #[arg(short, long)]
    output: std::path::PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ConvertTo {
    /// Pages at fixed offsets of a sparse file (capability mapped-ram).
    MappedRam,
    /// Pages as records of the stream.
    Plain,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Vm(args) => vm::run(*args),
        Cmd::Inspect { file, json, offset } => inspect(&file, json, offset),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Convert { input, output, to } => convert(&input, &output, to),
        Cmd::Report(args) => report(args),
    };
    if let Err(e) = result {
        eprintln!("vmigrate: {e:#}");
        std::process::exit(1);
    }
}

fn inspect(file: &std::path::Path, json: bool, offset: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    let map = vmigrate_engine::memory::MappedFile::open(file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let report = vmigrate_inspect::inspect(map.bytes(), offset);
    if json {
        println!("{:#}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if let Some(e) = &report.error {
        anyhow::bail!("{}: damaged stream: {e}", file.display());
    }
    Ok(())
}

fn convert(input: &std::path::Path, output: &std::path::Path, to: ConvertTo) -> anyhow::Result<()> {
    use vmigrate_convert::Layout;
    let layout = match to {
        ConvertTo::MappedRam => Layout::MappedRam,
        ConvertTo::Plain => Layout::Plain,
    };
    let s = vmigrate_convert::convert_file(input, output, layout)
        .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    println!(
        "{} ({}) -> {} ({layout}, {} bytes): {} RAM blocks, {} of {} pages with contents, \
         {} records copied",
        input.display(),
        s.from.map_or("?", Layout::name),
        output.display(),
        s.output_len,
        s.blocks,
        s.pages_with_contents,
        s.pages_total,
        s.records_copied,
    );
    Ok(())
}

fn report(args: ReportArgs) -> anyhow::Result<()> {
    let timeline = match (&args.timeline, &args.qmp) {
        (_, Some(qmp)) => report::fetch_timeline(qmp)?,
        (Some(path), None) => report::read_timeline(path)?,
        (None, None) => anyhow::bail!("give a timeline file or --qmp"),
    };
    report::write_page(&timeline, &args.output)?;
    println!("migration report written to {}", args.output.display());
    Ok(())
}
