//! Users, keys and trust between the lab's hosts: who may log in where, and who knows
//! whose host key.

use std::fs;
use std::process::Command;

use crate::*;

impl Lab {
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

    /// Empties `who`'s known_hosts.
    pub fn forget_known_hosts(&self, who: &str) {
        write(&self.host(who).root().join(".ssh/known_hosts"), "");
    }

    /// Puts `text` at the start of host `who`'s `~/.ssh/config` (ssh takes the first value).
    pub fn prepend_ssh_config(&self, who: &str, text: &str) {
        let path = self.host(who).root().join(".ssh/config");
        let old = fs::read_to_string(&path).unwrap_or_default();
        write(&path, &format!("{text}\n{old}"));
    }
}

impl Lab {
    /// Puts the lab's sops (`examples/lab_sops.rs`: sops' decrypt command carried out by an
    /// independent implementation, built by `cargo test` beside the test binaries) on host
    /// `name`, as `/root/.lab/bin/sops` (its own /root, on both host kinds); returns that
    /// path, for `clan.core.vars.sops.command`.
    pub fn install_sops(&self, name: &str) -> &'static str {
        let exe = std::env::current_exe().expect("the test binary");
        let built = exe
            .parent()
            .and_then(|deps| deps.parent())
            .map(|profile| profile.join("examples/lab_sops"))
            .filter(|p| p.is_file())
            .expect("examples/lab_sops is built by `cargo test` beside the test binaries");
        let dir = self.host(name).root().join(".lab/bin");
        fs::create_dir_all(&dir).expect("/root/.lab/bin");
        fs::copy(&built, dir.join("sops")).expect("copy the lab's sops");
        "/root/.lab/bin/sops"
    }
}
