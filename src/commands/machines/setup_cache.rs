//! `clan machines setup-cache`: the build host's binary-cache signing key for
//! `--copy-mode cache`, made once there (the secret half never leaves it), and the public
//! key printed with the settings that use it.

use crate::cli::SetupCacheArgs;
use crate::commands::machines::load_machine;
use crate::error::{Error, ExitKind};
use crate::resolve::BuildLocation;
use crate::ssh::{Invocation, RemoteCommand, SshHost, run_remote};

/// Makes the key on the build host (`src/scripts/setup-cache.sh`).
const SETUP_CACHE: &str = include_str!("../../scripts/setup-cache.sh");

/// Runs the command; returns the exit code.
pub fn run(args: &SetupCacheArgs) -> Result<ExitKind, Error> {
    let name_ok = !args.key_name.is_empty()
        && args
            .key_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !name_ok {
        return Err(Error::usage(format!(
            "invalid key name {:?} (from --key-name): letters, digits, '.', '_' and '-'",
            args.key_name
        )));
    }
    let machine = &load_machine(&args.hosts, &args.machine)?;
    let builder = match &machine.build.value {
        BuildLocation::Remote(address) => address.clone(),
        _ => {
            return Err(Error::usage(format!(
                "{}: it has no separate build host ({}): a binary cache is filled by a build host",
                machine.name, machine.build.source
            )));
        }
    };
    let host = SshHost::new(builder.clone(), args.connect.host_key_check);
    let mut script_args = vec![
        "-c",
        SETUP_CACHE,
        "clan-setup-cache",
        args.key_name.as_str(),
    ];
    let upload = match &args.upload {
        Some(upload) => {
            // Checked as a deploy's cache upload URL is.
            crate::boundary::CacheSettings::parse(
                upload,
                "file:///x",
                "checked:0000000000000000000000000000000000000000000=",
                &crate::boundary::Origin::CommandLine("--upload"),
            )
            .map_err(|e| Error::usage(e.to_string()))?;
            Some(upload.clone())
        }
        None => machine.cache.as_ref().map(|c| c.upload.clone()),
    };
    if let Some(upload) = &upload {
        script_args.push(upload.as_str());
    }
    let out = run_remote(
        &host,
        &RemoteCommand::Run(Invocation::new("sh", script_args)),
    )
    .map_err(|e| Error::new(format!("cannot run ssh: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("clan: public-key "))
        .filter(|_| out.status.success())
        .ok_or_else(|| {
            Error::new(format!("setting up the cache key on {builder} failed"))
                .detail(String::from_utf8_lossy(&out.stderr).trim_end().to_string())
        })?;
    let created = stdout.lines().any(|l| l == "clan: created");
    eprintln!(
        "{}: the build host {builder} {} the signing key ~/.config/clan/binary-cache.sec",
        machine.name,
        if created { "now has" } else { "already had" }
    );
    println!("{key}");
    eprintln!(
        "next: targets trust it with nix.settings.trusted-public-keys = [ \"{key}\" ];\n\
         and the inventory uses it: inventory.machines.<name>.deploy = {{ copyMode = \"cache\"; \
         cache.upload = \"file:///…\"; cache.url = \"http(s)://…\"; cache.publicKey = \"{key}\"; }};"
    );
    Ok(ExitKind::Success)
}
