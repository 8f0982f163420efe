//! Shared ssh connections: one master connection per host per deploy, in a private control
//! directory that is removed afterwards, so the many commands on a host share one login.
//! Hosts whose ssh config sets a ControlPath of their own keep it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::plan::connection_key;
use crate::ssh::SshHost;

/// A host and how opening its shared connection went.
type Opened = (SshHost, Result<(), String>);

/// The workstation's shared connections of one run.
#[derive(Debug)]
pub struct Connections {
    dir: Option<PathBuf>,
    opened: Mutex<BTreeMap<String, Opened>>,
}

impl Connections {
    /// Creates the private control directory for run `run_id` (sharing is off if that fails).
    pub fn new(run_id: &str) -> Connections {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        // Short: a socket path must fit in 108 bytes, and `%C` adds 40.
        let dir = base.join(format!("clan-ssh-{}", &run_id[..run_id.len().min(12)]));
        let created = fs::DirBuilder::new().mode(0o700).create(&dir).is_ok()
            && fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).is_ok();
        Connections {
            dir: created.then_some(dir),
            opened: Mutex::new(BTreeMap::new()),
        }
    }

    /// Connections that are never shared.
    pub fn disabled() -> Connections {
        Connections {
            dir: None,
            opened: Mutex::new(BTreeMap::new()),
        }
    }

    /// The control directory, if sharing is on.
    pub fn dir(&self) -> Option<String> {
        self.dir.as_ref().map(|d| d.display().to_string())
    }

    /// Opens the shared connection to `host` once; later calls return the first result.
    /// On failure, ssh's own message: the caller decides whether it matters.
    pub fn open(&self, host: &SshHost) -> Result<(), String> {
        let Some(argv) = host.master_argv() else {
            return Ok(());
        };
        let key = connection_key(&host.address);
        let mut opened = self.opened.lock().expect("connections lock");
        if let Some((_, result)) = opened.get(&key) {
            return result.clone();
        }
        let result = start_master(&argv);
        opened.insert(key, (host.clone(), result.clone()));
        result
    }

    /// Closes every shared connection and removes the control directory.
    pub fn close_all(&self) {
        let opened = std::mem::take(&mut *self.opened.lock().expect("connections lock"));
        for (host, result) in opened.values() {
            if result.is_ok()
                && let Some(argv) = host.exit_master_argv()
            {
                let _ = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Runs ssh in master mode. Its stderr goes to a file: the backgrounded master keeps it
/// open, so a pipe would never reach end-of-file.
fn start_master(argv: &[String]) -> Result<(), String> {
    let log = tempfile::tempfile().map_err(|e| format!("cannot create a temporary file: {e}"))?;
    let mut reader = log
        .try_clone()
        .map_err(|e| format!("cannot reopen a temporary file: {e}"))?;
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .status()
        .map_err(|e| format!("cannot run ssh: {e}"))?;
    if status.success() {
        return Ok(());
    }
    use std::io::{Read, Seek};
    let mut message = String::new();
    let _ = reader.rewind();
    let _ = reader.read_to_string(&mut message);
    Err(message)
}
