//! Systemd hosts: containers booted by `systemd-nspawn` with systemd as PID 1.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::*;

impl Lab {
    /// Boots host `name` as a systemd container: a root directory with a copy of the
    /// machine's `/etc` (its sshd listening on the host's address, units that do not belong
    /// masked), `/usr` read-only from the machine, and the host's own `/nix`, `/root`,
    /// `/etc/nix` and `/home`. Waits until its sshd answers.
    pub(crate) fn start_container(&mut self, name: &str, nix_daemon: bool) {
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
        // Every ssh session ends at once (sshd's whole unit killed), as when a switch
        // restarts sshd the hard way; sshd stays stopped (lab-sshd-start starts it).
        write(
            &host.root().join("lab-sshd-kill-sessions"),
            "#!/bin/sh\nsystemctl kill -s KILL ssh.service\nsystemctl stop ssh.service\n",
        );
        for script in ["lab-sshd-start", "lab-sshd-stop", "lab-sshd-kill-sessions"] {
            fs::set_permissions(host.root().join(script), fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        // The container's host name resolves locally: sudo looks it up on every call, and a
        // lookup that goes to DNS (unreachable here) costs seconds each time.
        let machine = format!("clan-lab-{}", host.ip.replace('.', "-"));
        append(&etc.join("hosts"), &format!("\n127.0.1.1 {machine}\n"));
        // A boot that does not bring sshd up in time is retried once (rarely, a container
        // here never starts it); the second time, the container's journal explains.
        for attempt in 1..=2 {
            match self.boot_container(name, &machine, &rootfs, &sshd_dir) {
                Ok(()) => return,
                Err(why) if attempt == 1 => {
                    eprintln!("lab: {why}; booting {name} again");
                    let init = self.init_pid(name);
                    if let Some(mut child) =
                        self.hosts.get_mut(name).and_then(|h| h.container.take())
                    {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    if let Some(init) = init {
                        kill_container_init(init);
                    }
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// Starts the container of host `name` and waits (30 s at most) until its sshd answers;
    /// on failure, why, with the end of the container's journal.
    fn boot_container(
        &mut self,
        name: &str,
        machine: &str,
        rootfs: &Path,
        sshd_dir: &Path,
    ) -> Result<(), String> {
        let host = self.hosts.get_mut(name).expect("host exists");
        let bind = |from: &Path, to: &str| format!("--bind={}:{to}", from.display());
        let child = Command::new("systemd-nspawn")
            .args(["--quiet", "--register=no", "--keep-unit", "--bind-ro=/usr"])
            .arg(format!("--directory={}", rootfs.display()))
            .arg(format!("--machine={machine}"))
            .arg(bind(&host.nix(), "/nix"))
            .arg(bind(&host.root(), "/root"))
            .arg(bind(&host.dir.join("etc-nix"), "/etc/nix"))
            .arg(bind(&host.dir.join("home"), "/home"))
            .arg(bind(sshd_dir, "/lab-sshd"))
            .arg("--boot")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (apt-get install systemd-container)");
        host.container = Some(child);
        let addr: SocketAddr = format!("{}:22", host.ip).parse().expect("socket address");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let host = self.hosts.get_mut(name).expect("host exists");
            if let Some(status) = host
                .container
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("the systemd container of {name} exited: {status}"));
            }
            if Instant::now() >= deadline {
                let journal = self
                    .init_pid(name)
                    .map(|pid| {
                        let out = Command::new("nsenter")
                            .args(["-t", &pid.to_string(), "-m", "-p", "--"])
                            .args(["journalctl", "--no-pager", "-n", "40"])
                            .output();
                        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                            .unwrap_or_default()
                    })
                    .unwrap_or_default();
                return Err(format!(
                    "sshd of the systemd host {name} did not start in 30 s: {}\n{journal}",
                    self.host(name).sshd_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The PID (as the machine sees it) of a systemd host's init: the child of its
    /// `systemd-nspawn`.
    pub fn init_pid(&self, name: &str) -> Option<u32> {
        let nspawn = self.host(name).container.as_ref()?.id();
        let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children.split_whitespace().find_map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then(|| pid.parse().ok())?
        })
    }
}
