//! How a built system reaches its target: sent by its builder ([`BuildBackend::send`]: the
//! build host's own copy, the second hop; a copy from the workstation; a relay through the
//! workstation), or through a binary cache (`--copy-mode cache`): the builder signs and
//! uploads it once, each target substitutes it.
//!
//! [`BuildBackend::send`]: super::build::BuildBackend::send

use super::{Builder, PlanContext, Role, StepKind, When};
use super::{Runner, Step};
use crate::boundary::CopyMode;
use crate::resolve::ResolvedMachine;
use crate::ssh::{Invocation, RemoteCommand, SshHost};

/// Signs a closure and copies it to a binary cache (`src/scripts/cache-upload.sh`).
const CACHE_UPLOAD: &str = include_str!("../scripts/cache-upload.sh");

/// The steps that put `machine`'s system into its target's store; each runs only when the
/// target lacks it.
pub(super) fn delivery_steps(
    machine: &ResolvedMachine,
    builder: &Builder,
    target: &SshHost,
    ctx: &PlanContext,
) -> Vec<Step> {
    let out = machine.out_path().as_str();
    let backend = builder.backend();
    let cache = machine
        .cache
        .as_ref()
        .filter(|_| machine.copy_mode.value == CopyMode::Cache);
    let builds_on_target = matches!(
        builder,
        Builder::Remote {
            role: Role::Target,
            ..
        }
    );
    let Some(cache) = cache.filter(|_| !builds_on_target) else {
        return backend.send(target, out, ctx).into_iter().collect();
    };
    let upload = Invocation::new(
        "sh",
        [
            "-c",
            CACHE_UPLOAD,
            "clan-cache-upload",
            out,
            cache.upload.as_str(),
        ],
    );
    // The target's own trusted-public-keys decide whether it accepts the paths.
    let mut realise = vec!["--realise".to_string(), out.to_string()];
    realise.extend(ctx.nix_flags.iter().cloned());
    realise.extend([
        "--option".into(),
        "extra-substituters".into(),
        cache.url.clone(),
    ]);
    vec![
        backend.run(StepKind::CacheUpload, upload, When::TargetLacksSystem, true),
        Step::new(
            StepKind::CacheSubstitute,
            Runner::Remote {
                role: Role::Target,
                host: target.clone(),
                command: RemoteCommand::UntilHangup(Invocation::new("nix-store", realise)),
            },
            When::TargetLacksSystem,
        ),
    ]
}
