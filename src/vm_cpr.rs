//! `vmigrate vm` as a cpr-transfer destination: a second `--incoming` names the `cpr`
//! channel (QEMU's JSON form), on which the CPR state arrives before guest RAM is mapped.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use vmigrate_engine::cpr::{self, CprFd};

/// The `--incoming` options split into the main one and the `cpr` channel's socket path.
pub fn split_incoming(specs: &[String]) -> Result<(Option<String>, Option<PathBuf>)> {
    let mut main = None;
    let mut cpr_path = None;
    for spec in specs {
        if spec.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(spec)
                .with_context(|| format!("invalid --incoming '{spec}'"))?;
            let addr = &v["addr"];
            match v["channel-type"].as_str() {
                Some("cpr") => {
                    if addr["transport"].as_str() != Some("socket")
                        || addr["type"].as_str() != Some("unix")
                    {
                        bail!("bad cpr channel address; must be unix");
                    }
                    let Some(path) = addr["path"].as_str() else {
                        bail!("invalid --incoming '{spec}': no path");
                    };
                    if cpr_path.replace(PathBuf::from(path)).is_some() {
                        bail!("Channel list has more than one cpr entry");
                    }
                }
                _ => {
                    bail!("invalid --incoming '{spec}': only a 'cpr' channel may be given as JSON")
                }
            }
        } else if main.replace(spec.clone()).is_some() {
            bail!("Channel list has more than one main entry");
        }
    }
    if cpr_path.is_some() && main.is_none() {
        bail!("Channel list has no main entry");
    }
    Ok((main, cpr_path))
}

/// The CPR state, read before guest RAM is mapped; the channel stays open until
/// [`Received::close`], which tells the source to connect the main channel.
pub struct Received {
    sock: UnixStream,
    pub fds: Vec<CprFd>,
}

/// Waits for the source on the `cpr` channel at `path` and reads the CPR state.
pub fn receive(path: &PathBuf) -> Result<Received> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on cpr channel '{}'", path.display()))?;
    let (sock, _) = listener.accept().context("cpr channel: accept")?;
    drop(listener);
    let _ = std::fs::remove_file(path);
    let fds = cpr::load_state(&sock).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Received { sock, fds })
}

impl Received {
    /// The descriptor handed over for RAM block `idstr`, checked against the block's
    /// size, as a path to map (`/proc/self/fd/N`).
    pub fn ram_path(&self, idstr: &str, len: u64) -> Result<Option<PathBuf>> {
        let Some(f) = self.fds.iter().find(|f| f.name == idstr && f.id == 0) else {
            return Ok(None);
        };
        cpr::check_ram_fd(idstr, f.fd.as_fd(), len).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Some(PathBuf::from(format!(
            "/proc/self/fd/{}",
            f.fd.as_raw_fd()
        ))))
    }

    /// Checks that a descriptor handed over for RAM block `idstr` is the file mapped
    /// from `mem_path`.
    pub fn check_same_file(&self, idstr: &str, mem_path: &PathBuf) -> Result<()> {
        let Some(f) = self.fds.iter().find(|f| f.name == idstr && f.id == 0) else {
            return Ok(());
        };
        let ours = std::fs::metadata(mem_path)
            .with_context(|| format!("cannot stat '{}'", mem_path.display()))?;
        let theirs = std::fs::File::from(f.fd.try_clone().context("cpr channel: dup")?)
            .metadata()
            .context("cpr channel: fstat")?;
        if ours.dev() != theirs.dev() || ours.ino() != theirs.ino() {
            bail!(
                "cpr channel: the descriptor for RAM block '{idstr}' is not the file '{}'",
                mem_path.display()
            );
        }
        Ok(())
    }

    /// Closes the channel: the source then connects the main channel.
    pub fn close(self) {
        drop(self.sock);
    }
}
