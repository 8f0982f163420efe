//! Shared ssh connections: one master connection per host per deploy, in a private control
//! directory that is removed afterwards, so the many commands on a host share one login.
//! Hosts whose ssh config sets a ControlPath of their own keep it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::host::connection_key;
use crate::ssh::SshHost;

/// A host and how opening its shared connection went (once, whoever asks first); on
/// success, the file where the master writes its messages (`ssh -E`), to read what it said
/// when it ended.
type Opened = (SshHost, Arc<OnceLock<Result<PathBuf, String>>>);

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
        let Some(mut argv) = host.master_argv() else {
            return Ok(());
        };
        let key = connection_key(&host.address);
        // Its messages, also once it runs in the background (where ssh sends its standard
        // error to /dev/null), go to a file of its own in the private directory.
        let log = match &self.dir {
            Some(dir) => {
                let name: String = key
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                dir.join(format!("{name}.log"))
            }
            None => return Ok(()),
        };
        argv.splice(1..1, ["-E".to_string(), log.display().to_string()]);
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
        slot.get_or_init(|| start_master(&argv, &log).map(|()| log.clone()))
            .clone()
            .map(|_| ())
    }

    /// What the shared connection to `host` said on its standard error (why it ended,
    /// such as "Timeout, server … not responding."), if it was opened.
    pub fn master_said(&self, host: &SshHost) -> Option<String> {
        let log = {
            let opened = self.opened.lock().expect("connections lock");
            let (_, slot) = opened.get(&connection_key(&host.address))?;
            slot.get()?.as_ref().ok()?.clone()
        };
        let said = fs::read_to_string(log).ok()?;
        Some(said).filter(|s| !s.trim().is_empty())
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
        // All at once: a fleet's run would otherwise end with one round trip per host.
        let exits: Vec<_> = opened
            .values()
            .filter(|(_, result)| matches!(result.get(), Some(Ok(_))))
            .filter_map(|(host, _)| host.exit_master_argv())
            .filter_map(|argv| {
                Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        for mut exit in exits {
            let _ = exit.wait();
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

/// Runs ssh in master mode, its messages going to `log` (`-E`); on failure, what it said.
fn start_master(argv: &[String], log: &std::path::Path) -> Result<(), String> {
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run ssh: {e}"))?;
    if status.success() {
        return Ok(());
    }
    Err(fs::read_to_string(log).unwrap_or_default())
}
