//! What the run learns of its hosts and itself before it plans: each host's own ssh
//! settings, the run's id, this workstation's name.

use std::collections::BTreeSet;
use std::io::Read;

use crate::error::{Error, Hint};
use crate::host::connection_key;
use crate::plan::DeployPlan;
use crate::resolve::{BuildLocation, ResolvedMachine, SshConfigLookup};

/// Hosts whose ssh config sets a ControlPath (their own sharing is kept) and hosts whose
/// ssh config sets keep-alives (clan adds none): `ssh -G` once per host, all at once.
pub fn own_ssh_settings(machines: &[ResolvedMachine]) -> (BTreeSet<String>, BTreeSet<String>) {
    // Each connection once: a build host shared by a fleet is asked about once.
    let mut addresses = std::collections::BTreeMap::new();
    for m in machines {
        addresses.insert(connection_key(&m.target.value), &m.target.value);
        if let BuildLocation::Remote(addr) = &m.build.value {
            addresses.insert(connection_key(addr), addr);
        }
    }
    // Sixteen at a time: a large fleet does not start hundreds of ssh processes at once.
    let addresses: Vec<(String, &crate::host::HostAddress)> = addresses.into_iter().collect();
    let mut settings: Vec<(String, crate::resolve::OwnSshSettings)> = Vec::new();
    for chunk in addresses.chunks(16) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(key, addr)| {
                    scope.spawn(move || (key.clone(), SshConfigLookup::own_settings(addr)))
                })
                .collect();
            settings.extend(handles.into_iter().filter_map(|h| h.join().ok()));
        });
    }
    let pick = |f: fn(&crate::resolve::OwnSshSettings) -> bool| {
        settings
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(k, _)| k.clone())
            .collect()
    };
    (pick(|s| s.control_path), pick(|s| s.keepalive))
}

/// The relay shares one `NIX_SSHOPTS` between both ends, so they must agree on the port.
pub fn check_relay<'a>(
    machines: impl IntoIterator<Item = &'a ResolvedMachine>,
) -> Result<(), Error> {
    for m in machines {
        if let BuildLocation::Remote(builder) = &m.build.value
            && builder.port.unwrap_or(22) != m.target.value.port.unwrap_or(22)
        {
            return Err(Error::usage(format!(
                "{}: --copy-via-workstation needs the build host {builder} and the target {} on the same ssh port",
                m.name, m.target.value
            ))
            .hint(Hint::text(
                "set the port in ~/.ssh/config (Host … Port …) instead of in the address",
            )));
        }
    }
    Ok(())
}

/// 16 hex digits from the kernel's random source: names temporary roots and units.
pub fn run_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    if bytes == [0; 8] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `user@host` of this workstation, as a target's lock shows it to other deploys: only
/// letters, digits and `.-_` (anything else becomes `_`).
pub fn workstation_identity() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let clean = |s: &str| -> String {
        let s: String = s
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if s.is_empty() { "unknown".into() } else { s }
    };
    format!("{}@{}", clean(&user), clean(&host))
}

/// One line naming every host whose key `--host-key-check none` leaves unchecked.
pub fn host_key_none_warning(plan: &DeployPlan) -> String {
    let mut hosts = std::collections::BTreeSet::new();
    for m in &plan.machines {
        hosts.insert(m.machine.target.value.destination());
        if let BuildLocation::Remote(builder) = &m.machine.build.value {
            hosts.insert(builder.destination());
        }
    }
    format!(
        "warning: --host-key-check none: host keys are not checked for {} (nor on the build host's copies to targets): anyone on the network path can impersonate these hosts",
        hosts.into_iter().collect::<Vec<_>>().join(", ")
    )
}
