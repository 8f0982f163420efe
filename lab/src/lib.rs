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

/// The name of the workstation in [`Lab`] calls.
pub const WORKSTATION: &str = "workstation";

/// How a host is set up.
#[derive(Debug, Clone)]
pub struct HostSpec {
    name: String,
    nix_system: Option<String>,
    current_nix: bool,
    max_jobs: Option<u32>,
    daemon_trusted_users: Option<Vec<String>>,
    kind: HostKind,
}

/// What runs a lab host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKind {
    /// A mount namespace with its own `/nix`, `/root`, `/etc/nix`, `/home` and `/run`, and
    /// an `sshd` of its own; no init system.
    #[default]
    Namespace,
    /// A container booted with systemd as PID 1 (`systemd-nspawn -b`), as on NixOS: sshd
    /// runs as `ssh.service`, `systemd-run` works, `/run` is its own.
    Systemd,
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostKind::Namespace => "namespace",
            HostKind::Systemd => "systemd",
        })
    }
}

impl HostSpec {
    /// A host with the machine's own Nix system.
    pub fn new(name: &str) -> HostSpec {
        HostSpec {
            name: name.to_string(),
            nix_system: None,
            current_nix: false,
            max_jobs: None,
            daemon_trusted_users: None,
            kind: HostKind::Namespace,
        }
    }

    /// Runs the host as `kind` (see [`HostKind`]).
    pub fn kind(mut self, kind: HostKind) -> HostSpec {
        self.kind = kind;
        self
    }

    /// Runs a `nix-daemon` on the host, so users other than root can use Nix, trusting
    /// root and `trusted` (`trusted-users`).
    pub fn nix_daemon(mut self, trusted: &[&str]) -> HostSpec {
        self.daemon_trusted_users = Some(trusted.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Sets `max-jobs` in the host's nix.conf (builds at once).
    pub fn max_jobs(mut self, jobs: u32) -> HostSpec {
        self.max_jobs = Some(jobs);
        self
    }

    /// Runs a current Nix (2.26, from `scripts/fetch-current-nix`) on this host instead of
    /// the system's 2.8: `nix`, `nix-store` and `nix-env` in its `/usr/local/bin`.
    pub fn current_nix(mut self) -> HostSpec {
        self.current_nix = true;
        self
    }

    /// Sets `system = …` in the host's nix.conf (e.g. `aarch64-linux`).
    pub fn nix_system(mut self, system: &str) -> HostSpec {
        self.nix_system = Some(system.to_string());
        self
    }
}

/// One simulated host.
#[derive(Debug)]
pub struct Host {
    /// Its name in the lab.
    pub name: String,
    /// Its loopback address.
    pub ip: String,
    /// Its directory: `nix/`, `root/`, `etc-nix/`, `home/`, `sshd/`.
    pub dir: PathBuf,
    /// What runs it.
    pub kind: HostKind,
    sshd: Option<Child>,
    daemon: Option<Child>,
    container: Option<Child>,
}

impl Host {
    /// The host's `/root` as seen from outside its namespace.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The host's `/nix` as seen from outside its namespace.
    pub fn nix(&self) -> PathBuf {
        self.dir.join("nix")
    }

    /// Whether `store_path` (`/nix/store/…`) is in this host's store.
    pub fn has_path(&self, store_path: &str) -> bool {
        let rel = store_path.trim_start_matches("/nix/");
        fs::symlink_metadata(self.nix().join(rel)).is_ok()
    }

    /// Where `/nix/var/nix/profiles/system` points, resolved to a store path.
    pub fn system_profile(&self) -> Option<String> {
        let profiles = self.nix().join("var/nix/profiles");
        let generation = fs::read_link(profiles.join("system")).ok()?;
        let target = fs::read_link(profiles.join(generation)).ok()?;
        Some(target.display().to_string())
    }

    /// The lines `switch-to-configuration` recorded on this host: `<toplevel> <action>`.
    pub fn switch_log(&self) -> Vec<String> {
        fs::read_to_string(self.root().join("switch-to-configuration.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether this host's known_hosts holds a key for `host` (hashed entries included).
    pub fn knows_host(&self, host: &str) -> bool {
        Command::new("ssh-keygen")
            .arg("-F")
            .arg(host)
            .arg("-f")
            .arg(self.root().join(".ssh/known_hosts"))
            .output()
            .map(|o| o.status.success() && !o.stdout.is_empty())
            .unwrap_or(false)
    }

    /// How many times the shared fixture dependency was built on this host.
    pub fn shared_builds(&self) -> usize {
        fs::read_to_string(self.root().join("shared-builds.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The sshd log.
    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd/sshd.log")).unwrap_or_default()
    }

    /// Successful ssh logins to this host, by source address (from sshd's log).
    pub fn logins_by_source(&self) -> BTreeMap<String, usize> {
        let mut logins = BTreeMap::new();
        for line in self.sshd_log().lines() {
            if let Some(rest) = line.split("Accepted publickey for ").nth(1)
                && let Some(from) = rest.split(" from ").nth(1)
                && let Some(ip) = from.split_whitespace().next()
            {
                *logins.entry(ip.to_string()).or_insert(0) += 1;
            }
        }
        logins
    }

    /// Number of store paths in this host's store.
    pub fn store_entries(&self) -> usize {
        fs::read_dir(self.nix().join("store"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name() != ".links")
                    .count()
            })
            .unwrap_or(0)
    }
}

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

/// A `/24` of loopback addresses of its own for each lab of each process.
fn subnet() -> String {
    let n = LABS.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    format!("127.{}.{}", 100 + pid % 150, n % 250)
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

/// nixpkgs' real `lib` (a flake with `lib`: the module system, no packages): the
/// `CLAN_NIXPKGS_LIB` directory, else `../shared/nixpkgs-lib` next to this repository, else
/// the copy vendored in `lab/nixpkgs-lib` (unchanged; see its PROVENANCE.md).
pub fn nixpkgs_lib() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLAN_NIXPKGS_LIB") {
        return PathBuf::from(dir);
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/nixpkgs-lib");
    let vendored = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixpkgs-lib");
    let found = [beside, PathBuf::from("/work/shared/nixpkgs-lib"), vendored]
        .into_iter()
        .find(|d| d.join("flake.nix").exists())
        .expect("nixpkgs' lib not found: set CLAN_NIXPKGS_LIB to a checkout of github:nix-community/nixpkgs.lib");
    found.canonicalize().expect("nixpkgs lib path")
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
        for script in [&start, &stop] {
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

    /// Boots host `name` as a systemd container: a root directory with a copy of the
    /// machine's `/etc` (its sshd listening on the host's address, units that do not belong
    /// masked), `/usr` read-only from the machine, and the host's own `/nix`, `/root`,
    /// `/etc/nix` and `/home`. Waits until its sshd answers.
    fn start_container(&mut self, name: &str, nix_daemon: bool) {
        let host = self.hosts.get_mut(name).expect("host exists");
        let rootfs = host.dir.join("rootfs");
        let sshd_dir = host.dir.join("sshd");
        fs::create_dir_all(&rootfs).expect("rootfs");
        {
            let _etc = ETC.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("cp").arg("-a").arg("/etc").arg(&rootfs));
        }
        let etc = rootfs.join("etc");
        let _ = fs::remove_file(etc.join("os-release"));
        fs::copy("/usr/lib/os-release", etc.join("os-release")).expect("os-release");
        for link in ["bin", "sbin", "lib", "lib64"] {
            std::os::unix::fs::symlink(format!("usr/{link}"), rootfs.join(link)).expect("link");
        }
        for dir in [
            "usr", "var", "tmp", "root", "nix", "run", "proc", "sys", "dev", "home", "lab-sshd",
        ] {
            fs::create_dir_all(rootfs.join(dir)).expect("rootfs dirs");
        }
        fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("tmp");
        // Only sshd (and nix-daemon when asked) of what the machine enables.
        let mut masked: Vec<String> = ["postgresql", "nix-daemon", "e2scrub_reap", "cron"]
            .iter()
            .map(|u| format!("{u}.service"))
            .collect();
        for wants in [
            "multi-user.target.wants",
            "sockets.target.wants",
            "timers.target.wants",
        ] {
            if let Ok(entries) = fs::read_dir(etc.join("systemd/system").join(wants)) {
                for entry in entries.flatten() {
                    masked.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        masked.push("nix-daemon.socket".into());
        for unit in masked {
            let keep = unit == "ssh.service" || (nix_daemon && unit.starts_with("nix-daemon"));
            if keep {
                continue;
            }
            let path = etc.join("systemd/system").join(&unit);
            let _ = fs::remove_file(&path);
            std::os::unix::fs::symlink("/dev/null", &path).expect("mask unit");
        }
        let host_key = sshd_dir.join("ssh_host_ed25519_key");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key));
        fs::set_permissions(&host_key, fs::Permissions::from_mode(0o600)).expect("chmod");
        write(
            &etc.join("ssh/sshd_config"),
            &sshd_config(&host.ip, "/lab-sshd/ssh_host_ed25519_key"),
        );
        write(
            &etc.join("default/ssh"),
            "SSHD_OPTS=\"-E /lab-sshd/sshd.log\"\n",
        );
        write(
            &host.root().join("lab-sshd-start"),
            "#!/bin/sh\nsystemctl start ssh.service\n",
        );
        write(
            &host.root().join("lab-sshd-stop"),
            "#!/bin/sh\nsystemctl stop ssh.service\n",
        );
        for script in ["lab-sshd-start", "lab-sshd-stop"] {
            fs::set_permissions(host.root().join(script), fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        // The container's host name resolves locally: sudo looks it up on every call, and a
        // lookup that goes to DNS (unreachable here) costs seconds each time.
        let machine = format!("clan-lab-{}", host.ip.replace('.', "-"));
        append(&etc.join("hosts"), &format!("\n127.0.1.1 {machine}\n"));
        let bind = |from: &Path, to: &str| format!("--bind={}:{to}", from.display());
        let child = Command::new("systemd-nspawn")
            .args(["--quiet", "--register=no", "--keep-unit", "--bind-ro=/usr"])
            .arg(format!("--directory={}", rootfs.display()))
            .arg(format!("--machine={machine}"))
            .arg(bind(&host.nix(), "/nix"))
            .arg(bind(&host.root(), "/root"))
            .arg(bind(&host.dir.join("etc-nix"), "/etc/nix"))
            .arg(bind(&host.dir.join("home"), "/home"))
            .arg(bind(&sshd_dir, "/lab-sshd"))
            .arg("--boot")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (apt-get install systemd-container)");
        host.container = Some(child);
        let addr: SocketAddr = format!("{}:22", host.ip).parse().expect("socket address");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = host
                .container
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the systemd container of {name} exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "sshd of the systemd host {name} did not start: {}",
                host.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The PID (as the machine sees it) of a systemd host's init: the child of its
    /// `systemd-nspawn`.
    fn init_pid(&self, name: &str) -> Option<u32> {
        let nspawn = self.host(name).container.as_ref()?.id();
        let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children.split_whitespace().find_map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then(|| pid.parse().ok())?
        })
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

    /// Adds a login user `user` (on the machine, once) whose home on host `on` authorizes
    /// every other lab host's key; with `password` it must give it to sudo, without it sudo asks
    /// for none. The machine's `/etc/sudoers.d/clan-lab-USER` grants it sudo.
    pub fn add_user(&self, on: &str, user: &str, password: Option<&str>) {
        let _etc = ETC.lock().unwrap_or_else(|e| e.into_inner());
        let exists = Command::new("id")
            .arg(user)
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            run(Command::new("useradd")
                .args(["--no-create-home", "--home-dir"])
                .arg(format!("/home/{user}"))
                .args(["--shell", "/bin/sh", user]));
        }
        match password {
            Some(password) => {
                let mut child = Command::new("chpasswd")
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("chpasswd");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(format!("{user}:{password}\n").as_bytes())
                    .expect("password");
                assert!(child.wait().expect("chpasswd").success());
            }
            // Not locked (sshd refuses locked accounts), and no password to type.
            None => {
                run(Command::new("usermod").args(["-p", "*", user]));
            }
        }
        let rule = match password {
            Some(_) => format!("{user} ALL=(ALL) ALL\n"),
            None => format!("{user} ALL=(ALL) NOPASSWD: ALL\n"),
        };
        write(Path::new(&format!("/etc/sudoers.d/clan-lab-{user}")), &rule);
        // Debian's nix-daemon socket is for the nix-users group (systemd hosts use it).
        let _ = Command::new("usermod")
            .args(["-a", "-G", "nix-users", user])
            .output();
        // Systemd hosts have a copy of /etc: give them the account and the rule too.
        for host in self.hosts.values().filter(|h| h.kind == HostKind::Systemd) {
            let etc = host.dir.join("rootfs/etc");
            for file in ["passwd", "shadow", "group", "gshadow"] {
                let _ = fs::copy(Path::new("/etc").join(file), etc.join(file));
            }
            write(&etc.join(format!("sudoers.d/clan-lab-{user}")), &rule);
        }
        let home = self.host(on).dir.join("home").join(user);
        fs::create_dir_all(home.join(".ssh")).expect("home");
        for owner in self.hosts.keys().filter(|h| *h != on) {
            append(
                &home.join(".ssh/authorized_keys"),
                &self.public_key(owner, ".ssh/id_ed25519"),
            );
        }
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(&home));
    }

    /// Replaces the sudo rule of `user` (made by [`Lab::add_user`]) with `rule`, a sudoers
    /// line, on the machine and on every systemd host.
    pub fn sudo_rule(&self, user: &str, rule: &str) {
        let rule = format!("{rule}\n");
        write(Path::new(&format!("/etc/sudoers.d/clan-lab-{user}")), &rule);
        for host in self.hosts.values().filter(|h| h.kind == HostKind::Systemd) {
            write(
                &host
                    .dir
                    .join(format!("rootfs/etc/sudoers.d/clan-lab-{user}")),
                &rule,
            );
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

    /// The public half of the key at `key` (relative to `/root`) of host `owner`.
    pub fn public_key(&self, owner: &str, key: &str) -> String {
        fs::read_to_string(self.host(owner).root().join(format!("{key}.pub"))).expect("public key")
    }

    /// Authorizes `owner`'s key at `key` (relative to `/root`) for root on `on`.
    pub fn authorize(&self, owner: &str, key: &str, on: &str) {
        append(
            &self.host(on).root().join(".ssh/authorized_keys"),
            &self.public_key(owner, key),
        );
    }

    /// Removes every authorized key of host `on`.
    pub fn deauthorize_all(&self, on: &str) {
        write(&self.host(on).root().join(".ssh/authorized_keys"), "");
    }

    /// Creates a key at `key` (relative to `/root`) on host `owner`.
    pub fn create_key(&self, owner: &str, key: &str) {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(self.host(owner).root().join(key)));
    }

    /// Removes host `owner`'s default key.
    pub fn remove_default_key(&self, owner: &str) {
        for f in ["id_ed25519", "id_ed25519.pub"] {
            let _ = fs::remove_file(self.host(owner).root().join(".ssh").join(f));
        }
    }

    /// Records host `of`'s key in `who`'s known_hosts.
    pub fn trust(&self, who: &str, of: &str) {
        let key = fs::read_to_string(self.host(of).dir.join("sshd/ssh_host_ed25519_key.pub"))
            .expect("host key");
        let key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        append(
            &self.host(who).root().join(".ssh/known_hosts"),
            &format!("{} {key}\n", self.ip(of)),
        );
    }

    /// Records a wrong key for host `of` in `who`'s known_hosts (`impostor`'s key under
    /// `of`'s address), as if `of` had been impersonated or reinstalled.
    pub fn trust_wrong_key(&self, who: &str, of: &str, impostor: &str) {
        let key = fs::read_to_string(
            self.host(impostor)
                .dir
                .join("sshd/ssh_host_ed25519_key.pub"),
        )
        .expect("host key");
        let key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        append(
            &self.host(who).root().join(".ssh/known_hosts"),
            &format!("{} {key}\n", self.ip(of)),
        );
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

    /// Empties `who`'s known_hosts.
    pub fn forget_known_hosts(&self, who: &str) {
        write(&self.host(who).root().join(".ssh/known_hosts"), "");
    }

    /// Writes a clan flake on the workstation and returns its directory. `clan_args` is a Nix
    /// attrset expression given to `lib.clan`; it can use `system { … }` to define a
    /// machine's configuration: `system { variant = "2"; networking.buildHost = "…"; }`.
    pub fn write_flake(&self, clan_args: &str) -> PathBuf {
        self.write_flake_with_shared_seconds(clan_args, 0)
    }

    /// [`Lab::write_flake`], with the shared dependency's build taking `seconds`.
    pub fn write_flake_with_shared_seconds(&self, clan_args: &str, seconds: u32) -> PathBuf {
        self.write_flake_in("flake", clan_args, seconds)
    }

    /// [`Lab::write_flake`] into the directory `rel` of the lab (any name: spaces, `#`…).
    pub fn write_flake_in(&self, rel: &str, clan_args: &str, seconds: u32) -> PathBuf {
        let lib = self.clan_lib();
        let flake = self.dir.join(rel);
        let _ = fs::remove_file(flake.join("flake.lock"));
        write(
            &flake.join("flake.nix"),
            &FIXTURE_FLAKE
                .replace("@LIB@", &lib.display().to_string())
                .replace("@NIXPKGS@", &nixpkgs_lib().display().to_string())
                .replace("@CLAN_ARGS@", clan_args)
                .replace("@SHARED_SECONDS@", &seconds.to_string()),
        );
        flake
    }

    /// This repository's Nix library, copied into the lab with its `nixpkgs` input pointed
    /// at [`nixpkgs_lib`] (nothing else of nixpkgs is reachable here).
    pub fn clan_lib(&self) -> PathBuf {
        let lib = self.dir.join("clan-lib");
        if !lib.exists() {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            fs::create_dir_all(&lib).expect("lib dir");
            let flake = fs::read_to_string(repo.join("flake.nix")).expect("flake.nix");
            write(
                &lib.join("flake.nix"),
                &flake.replace(
                    "github:NixOS/nixpkgs/nixos-unstable",
                    &format!("path:{}", nixpkgs_lib().display()),
                ),
            );
            run(Command::new("cp").arg("-r").arg(repo.join("nix")).arg(&lib));
        }
        lib
    }

    /// Writes `text` to `rel` inside the flake directory (call after [`Lab::write_flake`]).
    pub fn write_flake_file(&self, rel: &str, text: &str) {
        write(&self.dir.join("flake").join(rel), text);
    }

    /// Puts `text` at the start of host `who`'s `~/.ssh/config` (ssh takes the first value).
    pub fn prepend_ssh_config(&self, who: &str, text: &str) {
        let path = self.host(who).root().join(".ssh/config");
        let old = fs::read_to_string(&path).unwrap_or_default();
        write(&path, &format!("{text}\n{old}"));
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
        // shutdown, SIGKILL follows after a few seconds.
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
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab kept at {}", self.dir.display());
        }
    }
}

/// The fixture flake: a clan built with this repo's library and `minimalSystem`, whose
/// systems are plain derivations with a `switch-to-configuration` that records its calls.
const FIXTURE_FLAKE: &str = r#"{
  inputs.nixpkgs.url = "path:@NIXPKGS@";
  inputs.clan-core.url = "path:@LIB@";
  inputs.clan-core.inputs.nixpkgs.follows = "nixpkgs";
  outputs = { self, clan-core, nixpkgs }:
    let
      # A dependency every system with `shared = true` has; each build of it is counted in
      # /root/shared-builds.log on the host that builds it.
      shared = derivation {
        name = "shared-part";
        system = "x86_64-linux";
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        args = [ "-c" ''
          echo "$out" >> /root/shared-builds.log
          sleep ''${SHARED_SECONDS:-0}
          mkdir -p $out; echo shared > $out/data
        '' ];
        SHARED_SECONDS = "@SHARED_SECONDS@";
      };
      # A package whose name carries a version, for change summaries.
      package = nameVersion: derivation {
        name = nameVersion;
        system = "x86_64-linux";
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        args = [ "-c" "mkdir -p $out; echo ${nameVersion} > $out/version" ];
      };
      toplevel = name: args:
        let variant = args.variant or ""; in
        derivation ({
        packages = map package (args.packages or [ ]);
        name = "nixos-system-${name}${if variant == "" then "" else "-" + variant}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        inherit variant;
        seconds = toString (args.buildSeconds or 0);
        switchSeconds = toString (args.switchSeconds or 0);
        args = [ "-c" ''
          if [ "$variant" = fail ]; then echo "fixture build of ${name} fails on purpose" >&2; exit 1; fi
          sleep "$seconds"
          mkdir -p $out/bin
          if [ -n "''${sharedPart:-}" ]; then echo "$sharedPart" > $out/shared; fi
          if [ -n "''${packages:-}" ]; then echo "$packages" > $out/packages; fi
          if [ "$variant" = not-nixos ]; then exit 0; fi
          echo "25.05-${name}" > $out/nixos-version
          # Records each call and what it got on standard input (/root/switch-stdin.log);
          # keeps /run/current-system as NixOS does; takes switchSeconds; a healthy system
          # makes sure the host's sshd runs (the lab's /root/lab-sshd-start), "breaks-ssh"
          # stops it, "restarts-ssh" restarts it mid-switch, "switch-fails" fails.
          {
            echo '#!/bin/sh'
            echo "echo \"$out \$1\" >> /root/switch-to-configuration.log"
            echo 'timeout 1 cat >> /root/switch-stdin.log 2>/dev/null'
            echo "if [ \"\$1\" = switch ] || [ \"\$1\" = test ]; then ln -sfn $out /run/current-system; fi"
            echo "if [ $switchSeconds != 0 ] && [ \"\$1\" != dry-activate ]; then touch /root/switch-started; sleep $switchSeconds; echo \"$out \$1 done\" >> /root/switch-to-configuration.log; fi"
            case "$variant" in
              breaks-ssh) echo 'if [ "$1" = switch ] || [ "$1" = test ]; then /root/lab-sshd-stop; fi' ;;
              restarts-ssh) echo 'if [ "$1" = switch ]; then /root/lab-sshd-stop; sleep 1; /root/lab-sshd-start; sleep 1; fi' ;;
              switch-fails) echo 'echo "activating the fixture failed on purpose" >&2; exit 1' ;;
              *) echo 'if [ -x /root/lab-sshd-start ]; then /root/lab-sshd-start; fi' ;;
            esac
            # Vars: decrypt the machine's secrets on switch and test, as NixOS activation does.
            if [ -n "''${varsActivation:-}" ]; then
              echo "if [ \"\$1\" = switch ] || [ \"\$1\" = test ]; then sh $out/bin/clan-vars-activate || exit 1; fi"
            fi
          } > $out/bin/switch-to-configuration
          chmod +x $out/bin/switch-to-configuration
          if [ -n "''${varsActivation:-}" ]; then printf '%s\n' "$varsActivation" > $out/bin/clan-vars-activate; fi
        '' ];
      } // (if args.shared or false then { sharedPart = shared; } else { })
        # Only systems with vars carry their decryption, so other systems keep their paths.
        // (if (args.varsActivation or "") != "" then { inherit (args) varsActivation; } else { })
        // (if args ? publicVar then { inherit (args) publicVar; } else { }));
      system = args: { config, ... }: {
        nixpkgs.hostPlatform = args.hostPlatform or "x86_64-linux";
        clan.core.networking = args.networking or { };
        # `vars`: clan.core.vars.generators; `publicVarOf = [ gen file ]` puts that public
        # value into the system.
        clan.core.vars.generators = args.vars or { };
        system.build.toplevel = toplevel config.networking.hostName (args // {
          varsActivation = config.clan.core.vars.activationScript;
        } // (if args ? publicVarOf then {
          publicVar = config.clan.core.vars.generators.${builtins.elemAt args.publicVarOf 0}.files.${builtins.elemAt args.publicVarOf 1}.value;
        } else { }));
      };
      clan = clan-core.lib.clan ({
        inherit self;
        nixosSystem = clan-core.lib.minimalSystem;
      } // (@CLAN_ARGS@));
    in {
      inherit (clan.config) nixosConfigurations clanInternals;
      # For machine files (machines/<name>/configuration.nix): `{ self, ... }: { imports =
      # [ (self.fixture.system { }) ]; }`.
      fixture = { inherit system; };
    };
}
"#;
