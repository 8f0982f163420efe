//! A lab of simulated hosts for testing `clan` against real OpenSSH and real Nix.
//!
//! Each host is a mount namespace (`unshare --mount`) with its own `/nix`, `/root` and
//! `/etc/nix` bind-mounted from a directory of the lab, and its own `sshd` listening on a
//! loopback address of its own. The workstation is a namespace too (without sshd), so
//! nothing touches the machine's real `~/.ssh` or `/nix`. Dropping the [`Lab`] stops every
//! sshd it started and removes its directory (set `CLAN_LAB_KEEP=1` to keep it).
//!
//! Keys are set up as a user would: the workstation's key is authorized on every host, and
//! every host has a key of its own that the other hosts authorize. The workstation knows
//! every host key; hosts know each other's keys only after [`Lab::trust`].

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod accounts;
mod container;
mod fixtures;
mod host;

pub use fixtures::{isolated_nix, nixpkgs_lib};
pub use host::{Host, HostKind, HostSpec};

/// The name of the workstation in [`Lab`] calls.
pub const WORKSTATION: &str = "workstation";

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    /// The lab's directory.
    pub dir: PathBuf,
    hosts: BTreeMap<String, Host>,
    keep: bool,
    servers: Vec<(std::sync::Arc<std::sync::atomic::AtomicBool>, SocketAddr)>,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// Held while the machine's `/etc` changes (users) or is copied (systemd hosts): `useradd`
/// refuses to run while another holds `/etc/passwd`'s lock, and a copy must not see half
/// an account.
static ETC: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A `/24` of loopback addresses of its own for each lab of each process. One where an
/// sshd already answers (a lab left behind by a run that was killed) is skipped: its host
/// keys would clash with this lab's.
fn subnet() -> String {
    let pid = std::process::id();
    loop {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let subnet = format!("127.{}.{}", 100 + (pid + n / 250) % 150, n % 250);
        let first_host: SocketAddr = format!("{subnet}.3:22").parse().expect("an address");
        if std::net::TcpStream::connect_timeout(&first_host, Duration::from_millis(200)).is_err() {
            return subnet;
        }
    }
}

const NIX_CONF: &str = "experimental-features = nix-command flakes
sandbox = false
substituters =
build-users-group =
";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("path has a parent")).expect("mkdir");
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn append(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("append");
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// SIGKILL to a container's init (and so to its whole PID namespace), if that process is
/// still a systemd.
pub(crate) fn kill_container_init(init: u32) {
    let is_systemd =
        fs::read_to_string(format!("/proc/{init}/comm")).is_ok_and(|comm| comm.trim() == "systemd");
    if is_systemd && let Ok(pid) = libc_pid(init) {
        // SAFETY: kill(2) with a positive pid signals one process.
        unsafe { kill(pid, 9) };
    }
}

fn libc_pid(pid: u32) -> Result<i32, std::num::TryFromIntError> {
    i32::try_from(pid)
}

/// The `/24` prefix of an address (`127.1.2.3` → `127.1.2`).
fn subnet_of(ip: &str) -> String {
    ip.rsplit_once('.')
        .map_or(ip, |(prefix, _)| prefix)
        .to_string()
}

/// Answers one HTTP GET with the file it names under `root` (no `..`), else 404.
fn serve_one(mut stream: TcpStream, root: &Path) {
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let path = path
        .split('?')
        .next()
        .unwrap_or("/")
        .trim_start_matches('/');
    let head = request.starts_with("HEAD ");
    let file = (!path.split('/').any(|c| c == ".."))
        .then(|| root.join(path))
        .and_then(|p| fs::read(p).ok());
    let _ = match file {
        Some(bytes) => {
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            if head {
                Ok(())
            } else {
                stream.write_all(&bytes)
            }
        }
        None => write!(
            stream,
            "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    };
}

/// The lab's sshd configuration for a host at `ip` with the host key at `key`.
fn sshd_config(ip: &str, key: &str) -> String {
    format!(
        "ListenAddress {ip}:22\nHostKey {key}\nUsePAM no\nStrictModes no\n\
         AuthorizedKeysFile /root/.ssh/authorized_keys\nPermitRootLogin prohibit-password\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel VERBOSE\n\
         AcceptEnv LANG\nSubsystem sftp internal-sftp\n"
    )
}

/// `argv` under a time limit, so that a hung command cannot hang the test suite.
fn with_time_limit<'a>(argv: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["timeout", "--kill-after=10", "600"];
    full.extend_from_slice(argv);
    full
}

/// Where `scripts/fetch-current-nix` unpacks the current Nix.
pub fn current_nix_root() -> PathBuf {
    std::env::var_os("CLAN_LAB_CURRENT_NIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/clan-lab/nix-current"))
}

/// Links `nix`, `nix-store`, `nix-env`, … of the current Nix into `bin`, which the host's
/// namespace mounts over `/usr/local/bin`.
fn install_current_nix(bin: &Path) {
    let current = current_nix_root().join("bin");
    assert!(
        current.join("nix").exists(),
        "current Nix is missing at {}: run scripts/setup (it runs scripts/fetch-current-nix)",
        current.display()
    );
    fs::create_dir_all(bin).expect("bin dir");
    for entry in fs::read_dir(&current).expect("current Nix bin dir") {
        let entry = entry.expect("dir entry");
        std::os::unix::fs::symlink(current.join(entry.file_name()), bin.join(entry.file_name()))
            .expect("link current Nix");
    }
}

/// The argv that runs `argv` inside the namespace of the host whose directory is `dir`:
/// its own `/nix`, `/root`, `/etc/nix`, `/home` and `/run`.
pub fn namespaced(dir: &Path, argv: &[&str]) -> Vec<String> {
    let mut all = vec![
        "unshare".to_string(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        concat!(
            r#"d=$1; shift; mount --bind "$d/nix" /nix && mount --bind "$d/root" /root && mount --bind "$d/etc-nix" /etc/nix && mount --bind "$d/home" /home && mount --bind "$d/run" /run && "#,
            r#"if [ -d "$d/bin" ]; then mount --bind "$d/bin" /usr/local/bin && PATH=/usr/local/bin:$PATH; fi && exec "$@""#
        )
        .into(),
        "sh".into(),
        dir.display().to_string(),
    ];
    all.extend(argv.iter().map(|s| s.to_string()));
    all
}

impl Lab {
    /// Starts a lab with a workstation and `hosts`, keys authorized everywhere, the
    /// workstation knowing every host key, hosts knowing none of each other's.
    pub fn start(hosts: &[HostSpec]) -> Lab {
        for dir in ["/nix", "/etc/nix", "/run/sshd"] {
            fs::create_dir_all(dir).expect("create mount points");
        }
        let base = tempfile::Builder::new()
            .prefix("clan-lab-")
            .tempdir_in("/tmp")
            .expect("lab dir")
            .keep();
        let keep = std::env::var_os("CLAN_LAB_KEEP").is_some();
        let subnet = subnet();
        let mut lab = Lab {
            dir: base.clone(),
            hosts: BTreeMap::new(),
            keep,
            servers: Vec::new(),
        };
        // A spec named WORKSTATION configures the workstation; it gets no sshd.
        let workstation = hosts
            .iter()
            .find(|h| h.name == WORKSTATION)
            .cloned()
            .unwrap_or_else(|| HostSpec::new(WORKSTATION));
        let hosts: Vec<HostSpec> = hosts
            .iter()
            .filter(|h| h.name != WORKSTATION)
            .cloned()
            .collect();
        for (i, spec) in std::iter::once(&workstation).chain(&hosts).enumerate() {
            let host = Host {
                name: spec.name.clone(),
                ip: format!("{subnet}.{}", i + 2),
                dir: base.join(&spec.name),
                kind: spec.kind,
                sshd: None,
                daemon: None,
                container: None,
            };
            for sub in ["nix", "root/.ssh", "etc-nix", "sshd", "home", "run/sshd"] {
                fs::create_dir_all(host.dir.join(sub)).expect("host dirs");
            }
            let mut conf = NIX_CONF.to_string();
            if let Some(system) = &spec.nix_system {
                conf.push_str(&format!("system = {system}\n"));
            }
            if let Some(trusted) = &spec.daemon_trusted_users {
                conf.push_str(&format!("trusted-users = root {}\n", trusted.join(" ")));
            }
            if let Some(jobs) = spec.max_jobs {
                conf.push_str(&format!("max-jobs = {jobs}\n"));
            }
            if spec.current_nix {
                install_current_nix(&host.dir.join("bin"));
            }
            write(&host.dir.join("etc-nix/nix.conf"), &conf);
            let key = host.root().join(".ssh/id_ed25519");
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                .arg(format!("root@{}", spec.name))
                .arg("-f")
                .arg(&key));
            // Outgoing connections come from the host's own address, so sshd logs and
            // `from=` rules see which host connects.
            write(
                &host.root().join(".ssh/config"),
                &format!("Host *\n  BindAddress {}\n", host.ip),
            );
            lab.hosts.insert(spec.name.clone(), host);
        }
        for spec in &hosts {
            match spec.kind {
                HostKind::Namespace => {
                    lab.start_sshd(&spec.name);
                    if spec.daemon_trusted_users.is_some() {
                        lab.start_daemon(&spec.name);
                    }
                }
                HostKind::Systemd => {
                    lab.start_container(&spec.name, spec.daemon_trusted_users.is_some())
                }
            }
        }
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        for name in &names {
            for client in std::iter::once(WORKSTATION.to_string()).chain(names.iter().cloned()) {
                if &client != name {
                    lab.authorize(&client, ".ssh/id_ed25519", name);
                }
            }
            lab.trust(WORKSTATION, name);
        }
        lab
    }

    /// A builder and a target, as in the guide; the builder already knows the target's key.
    pub fn builder_and_target() -> Lab {
        let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
        lab.trust("builder", "target");
        lab
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("no lab host {name}"))
    }

    /// The address of host `name`.
    pub fn ip(&self, name: &str) -> &str {
        &self.host(name).ip
    }

    fn start_sshd(&mut self, name: &str) {
        let host = self.hosts.get_mut(name).expect("host exists");
        let sshd_dir = host.dir.join("sshd");
        let host_key = sshd_dir.join("ssh_host_ed25519_key");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key));
        let config = format!(
            "{}PidFile none\n",
            sshd_config(&host.ip, &host_key.display().to_string())
        );
        let config_path = sshd_dir.join("sshd_config");
        write(&config_path, &config);
        // For fixture systems that stop or need sshd: stop the listener (sessions go on), or
        // start it again as a daemon in this host's namespace.
        let listener = format!("/usr/sbin/sshd .*-f {}", config_path.display());
        let start = host.root().join("lab-sshd-start");
        write(
            &start,
            &format!(
                "#!/bin/sh\npgrep -f '{listener}' >/dev/null && exit 0\nexec /usr/sbin/sshd -f {} -E {}\n",
                config_path.display(),
                sshd_dir.join("sshd.log").display()
            ),
        );
        let stop = host.root().join("lab-sshd-stop");
        write(&stop, &format!("#!/bin/sh\npkill -f '{listener}'\n"));
        // Every sshd process of this host (the listener and every session: they see its
        // /nix) killed; sshd stays stopped (lab-sshd-start starts it). The listener first:
        // process ids wrap around, so a session listed before it would otherwise die first,
        // and a login the listener accepted meanwhile would outlive the kill.
        let kill_sessions = host.root().join("lab-sshd-kill-sessions");
        write(
            &kill_sessions,
            &format!(
                "#!/bin/sh\npkill -KILL -f '{listener}'\nfor p in $(pgrep -x sshd); do grep -qF '{}' /proc/$p/mountinfo 2>/dev/null && kill -KILL $p; done\nexit 0\n",
                host.nix().display(),
            ),
        );
        for script in [&start, &stop, &kill_sessions] {
            fs::set_permissions(script, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        fs::set_permissions(&host_key, fs::Permissions::from_mode(0o600)).expect("chmod");
        let argv = namespaced(
            &host.dir,
            &[
                "/usr/sbin/sshd",
                "-D",
                "-f",
                &config_path.display().to_string(),
                "-E",
                &sshd_dir.join("sshd.log").display().to_string(),
            ],
        );
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .spawn()
            .expect("start sshd");
        host.sshd = Some(child);
        let addr: SocketAddr = format!("{}:22", host.ip).parse().expect("socket address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd of {name} did not start: {}",
                host.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_daemon(&mut self, name: &str) {
        let host = self.hosts.get_mut(name).expect("host exists");
        let argv = namespaced(&host.dir, &["nix-daemon"]);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nix-daemon");
        host.daemon = Some(child);
        let socket = host.nix().join("var/nix/daemon-socket/socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "nix-daemon of {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The generations of host `name`'s system profile: (number, store path), oldest first.
    pub fn generations(&self, name: &str) -> Vec<(u32, String)> {
        let profiles = self.host(name).nix().join("var/nix/profiles");
        let mut found: Vec<(u32, String)> = fs::read_dir(&profiles)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let file = e.file_name().to_string_lossy().into_owned();
                        let n = file.strip_prefix("system-")?.strip_suffix("-link")?;
                        let target = fs::read_link(e.path()).ok()?;
                        Some((n.parse().ok()?, target.display().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }

    /// Appends `line` to host `name`'s nix.conf (e.g. `trusted-public-keys = …`).
    pub fn append_nix_conf(&self, name: &str, line: &str) {
        append(
            &self.host(name).dir.join("etc-nix/nix.conf"),
            &format!("{line}\n"),
        );
    }

    /// Serves the files under `dir` (as the machine sees it) over HTTP on a loopback address
    /// of this lab, for a binary cache; returns the URL. Stops with the lab.
    pub fn serve_http(&mut self, dir: &Path) -> String {
        let listener =
            std::net::TcpListener::bind(format!("{}.250:0", subnet_of(self.ip(WORKSTATION))))
                .expect("bind the lab's HTTP server");
        let addr = listener.local_addr().expect("address");
        let root = dir.to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let root = root.clone();
                std::thread::spawn(move || serve_one(stream, &root));
            }
        });
        self.servers.push((stop, addr));
        format!("http://{addr}")
    }

    /// Runs `argv` on the workstation (in its namespace), in `cwd`, with a time limit.
    pub fn run_on_workstation(&self, cwd: &Path, argv: &[&str]) -> Output {
        self.workstation_command(cwd, &with_time_limit(argv))
            .stdin(Stdio::null())
            .output()
            .expect("run on workstation")
    }

    /// Like [`Lab::run_on_workstation`], with `input` on standard input.
    pub fn run_on_workstation_with_input(&self, cwd: &Path, argv: &[&str], input: &str) -> Output {
        let mut child = self
            .workstation_command(cwd, &with_time_limit(argv))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run on workstation");
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes());
        child.wait_with_output().expect("run on workstation")
    }

    /// Starts `argv` on the workstation (in its namespace), in `cwd`, output piped.
    pub fn spawn_on_workstation(&self, cwd: &Path, argv: &[&str]) -> Child {
        self.workstation_command(cwd, argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn on workstation")
    }

    /// `argv` in the workstation's namespace, in `cwd`, as root.
    fn workstation_command(&self, cwd: &Path, argv: &[&str]) -> Command {
        let ns = namespaced(&self.host(WORKSTATION).dir, argv);
        let mut command = Command::new(&ns[0]);
        command.args(&ns[1..]).current_dir(cwd).env("USER", "root");
        command
    }

    /// Where `/run/current-system` points on host `name`, if anywhere.
    pub fn current_system(&self, name: &str) -> Option<String> {
        let out = self.exec(name, &["readlink", "-f", "/run/current-system"]);
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !path.is_empty() && self.host(name).has_path(&path))
            .then_some(path)
    }

    /// The processes of this lab (of its workstation and hosts, in their namespaces, or
    /// started from its directory) whose command line matches `pattern` (`pgrep -f`), as
    /// `pid command-line` lines. Other labs run beside this one: a machine-wide match would
    /// find their processes too.
    pub fn processes(&self, pattern: &str) -> Vec<String> {
        let out = Command::new("pgrep")
            .args(["-a", "-f", pattern])
            .output()
            .expect("pgrep");
        // The lab directory's own name is random: any mount or path of this lab holds it.
        let mark = self
            .dir
            .file_name()
            .expect("the lab has a directory")
            .to_string_lossy()
            .into_owned();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| {
                let pid = line.split_whitespace().next().unwrap_or("");
                line.contains(&mark)
                    || fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                        .is_ok_and(|m| m.contains(&mark))
                    || fs::read_link(format!("/proc/{pid}/cwd"))
                        .is_ok_and(|cwd| cwd.to_string_lossy().contains(&mark))
            })
            .map(str::to_string)
            .collect()
    }

    /// What of `clan` still runs on host `name`: its processes (`pgrep -a -f clan-`), and on
    /// a systemd host its units (`clan-*`). Empty when nothing does.
    pub fn clan_leftovers(&self, name: &str) -> String {
        let mut found = String::new();
        let host = self.host(name);
        if host.kind == HostKind::Systemd {
            let out = self.exec(
                name,
                &["systemctl", "list-units", "--no-legend", "--all", "clan-*"],
            );
            found.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        // Processes whose command line runs the activation script on this host's addresses:
        // namespace hosts share the machine's process table, so look for this run's marks.
        let out = Command::new("pgrep")
            .args(["-a", "-f", "clan-activate"])
            .output()
            .expect("pgrep");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let pid = line.split_whitespace().next().unwrap_or("");
            let mount_ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            let in_host = match host.kind {
                HostKind::Systemd => self
                    .init_pid(name)
                    .and_then(|init| mount_ns(&init.to_string()))
                    .is_some_and(|ns| mount_ns(pid) == Some(ns)),
                // A namespace host's processes see its /nix: check their mounts.
                HostKind::Namespace => fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                    .is_ok_and(|m| m.contains(&host.nix().display().to_string())),
            };
            if in_host {
                found.push_str(line);
                found.push('\n');
            }
        }
        found
    }

    /// Runs `argv` on host `name` in its namespace (not through ssh), for set-up and checks.
    /// On a systemd host it runs in the container's mount namespace (its `/run`, its
    /// units) when the container runs.
    pub fn exec(&self, name: &str, argv: &[&str]) -> Output {
        let ns = match self.host(name).kind {
            HostKind::Systemd if let Some(pid) = self.init_pid(name) => {
                let mut all: Vec<String> = ["nsenter", "--mount", "--target"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                all.push(pid.to_string());
                all.push("--".into());
                all.extend(argv.iter().map(|s| s.to_string()));
                all
            }
            _ => namespaced(&self.host(name).dir, argv),
        };
        Command::new(&ns[0])
            .args(&ns[1..])
            .stdin(Stdio::null())
            .output()
            .expect("exec in host")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (stop, addr) in &self.servers {
            stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect_timeout(addr, Duration::from_millis(200));
        }
        // Containers shut down in parallel: SIGTERM asks systemd-nspawn for a clean
        // shutdown, SIGKILL follows after a few seconds, to nspawn and to the container's
        // init (killing nspawn alone leaves the container running, orphaned: its systemd
        // then holds inotify instances that later containers need).
        let inits: Vec<u32> = self
            .hosts
            .keys()
            .filter_map(|name| self.init_pid(name))
            .collect();
        let containers: Vec<Child> = self
            .hosts
            .values_mut()
            .filter_map(|h| h.container.take())
            .collect();
        for child in &containers {
            if let Ok(pid) = libc_pid(child.id()) {
                // SAFETY: kill(2) with a positive pid signals one process.
                unsafe { kill(pid, 15) };
            }
        }
        for mut child in containers {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for init in inits {
            kill_container_init(init);
        }
        for host in self.hosts.values_mut() {
            for mut child in [host.sshd.take(), host.daemon.take()].into_iter().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // An sshd that a fixture system restarted is no child of ours.
        for host in self.hosts.values() {
            let config = host.dir.join("sshd/sshd_config");
            let _ = Command::new("pkill")
                .args(["-f", &format!("/usr/sbin/sshd .*-f {}", config.display())])
                .status();
        }
        // Sessions whose sshd is gone may still hold a store open: end them by their address.
        let ips: Vec<&str> = self.hosts.values().map(|h| h.ip.as_str()).collect();
        for ip in ips {
            let _ = Command::new("pkill")
                .args(["-f", &format!("sshd: .*{ip}")])
                .status();
        }
        if !self.keep {
            self.remove_runs_leftovers();
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab kept at {}", self.dir.display());
        }
    }
}

impl Lab {
    /// What this lab's runs left in the machine's `/tmp`, which its namespace hosts share: a
    /// run removes its directories (`/tmp/clan-RUN-*` on builders, `/tmp/clan-ssh-RUN` on
    /// the workstation) itself, but one a test killed on purpose, or whose host it froze,
    /// cannot. The runs are the workstation's log directories, one per run.
    fn remove_runs_leftovers(&self) {
        let Some(workstation) = self.hosts.get(WORKSTATION) else {
            return;
        };
        let logs = workstation.root().join(".local/state/clan/logs");
        let runs: Vec<String> = fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|r| r.len() == 16 && r.chars().all(|c| c.is_ascii_hexdigit()))
            .collect();
        if runs.is_empty() {
            return;
        }
        for entry in fs::read_dir("/tmp").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = runs.iter().any(|run| {
                name.starts_with(&format!("clan-{run}-"))
                    || name == format!("clan-ssh-{}", &run[..12])
            });
            if ours {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A subnet where something answers on the first host's ssh port (a lab a killed run left
    // behind) is not handed out again.
    #[test]
    fn a_subnet_in_use_is_skipped() {
        let pid = std::process::id();
        let n = LABS.load(Ordering::SeqCst);
        let next = format!("127.{}.{}", 100 + (pid + n / 250) % 150, n % 250);
        let _taken = std::net::TcpListener::bind(format!("{next}.3:22")).expect("bind");
        let got = subnet();
        assert_ne!(got, next);
        assert!(got.starts_with("127."));
    }
}
