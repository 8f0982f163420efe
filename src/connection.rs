//! Shared ssh connections: one master connection per host per deploy, in a private control
//! directory that is removed afterwards, so the many commands on a host share one login.
//! Hosts whose ssh config sets a ControlPath of their own keep it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::plan::connection_key;
use crate::ssh::SshHost;

/// A host and how opening its shared connection went (once, whoever asks first).
type Opened = (SshHost, Arc<OnceLock<Result<(), String>>>);

/// The workstation's shared connections of one run.
#[derive(Debug)]
pub struct Connections {
    dir: Option<PathBuf>,
    opened: Mutex<BTreeMap<String, Opened>>,
    sessions: Mutex<BTreeMap<String, Arc<Semaphore>>>,
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
            sessions: Mutex::new(BTreeMap::new()),
        }
    }

    /// Connections that are never shared.
    pub fn disabled() -> Connections {
        Connections {
            dir: None,
            opened: Mutex::new(BTreeMap::new()),
            sessions: Mutex::new(BTreeMap::new()),
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
        // The lock only finds the host's slot: other hosts connect at the same time.
        let slot = Arc::clone(
            &self
                .opened
                .lock()
                .expect("connections lock")
                .entry(key)
                .or_insert_with(|| (host.clone(), Arc::new(OnceLock::new())))
                .1,
        );
        slot.get_or_init(|| start_master(&argv)).clone()
    }

    /// The session slot for a command on `host`: limited when it goes over a shared
    /// connection, free otherwise.
    pub fn session(&self, host: &SshHost) -> Session {
        if host.control_path.is_none() {
            return Session(None);
        }
        let key = connection_key(&host.address);
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let sem = sessions
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(SESSIONS_PER_CONNECTION)));
        Session(Some(Arc::clone(sem)))
    }

    /// A slot that limits nothing, for commands that use no shared connection.
    pub fn session_free(&self) -> Session {
        Session(None)
    }

    /// Closes every shared connection and removes the control directory.
    pub fn close_all(&self) {
        let opened = std::mem::take(&mut *self.opened.lock().expect("connections lock"));
        for (host, result) in opened.values() {
            if matches!(result.get(), Some(Ok(())))
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

/// A counting semaphore: at most `n` holders.
#[derive(Debug)]
pub(crate) struct Semaphore {
    free: Mutex<usize>,
    changed: Condvar,
}

impl Semaphore {
    pub(crate) fn new(n: usize) -> Semaphore {
        Semaphore {
            free: Mutex::new(n.max(1)),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().expect("semaphore lock");
        while *free == 0 {
            free = self.changed.wait(free).expect("semaphore lock");
        }
        *free -= 1;
        Permit(self)
    }
}

pub(crate) struct Permit<'a>(&'a Semaphore);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("semaphore lock") += 1;
        self.0.changed.notify_one();
    }
}

/// A session slot on a shared connection, held while a command runs over it.
pub struct Session(Option<Arc<Semaphore>>);

impl Session {
    /// Runs `f` while holding the slot.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some(sem) => {
                let _permit = sem.acquire();
                f()
            }
            None => f(),
        }
    }
}

/// Sessions one shared connection carries at once: sshd refuses more than `MaxSessions`
/// (10 by default) on one connection.
const SESSIONS_PER_CONNECTION: usize = 8;

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
