//! The `clan` binary: parses the command line, runs the subcommand, and turns how it
//! ended into the process exit code (the only place that does).

use clap::Parser;

use clan::cli::{Cli, MachinesCommand, TopCommand, VarsCommand};
use clan::commands::machines::{list, rollback, setup_build_host, setup_cache, show, update};

fn main() {
    // A closed standard output (`clan machines show | head -1`) ends the process quietly,
    // as for any command-line tool, instead of a panic in println!.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // `COMPLETE=SHELL clan …`: the shell asks for completions (see `clan completions`).
    clap_complete::CompleteEnv::with_factory(<Cli as clap::CommandFactory>::command).complete();
    let cli = Cli::parse();
    // Commands that change hosts cannot be ended by a closed output (`| head -3`): they
    // write through relays and go on as if detached (see clan::output).
    let changes_hosts = !matches!(
        &cli.command,
        TopCommand::Machines(
            MachinesCommand::Show(_) | MachinesCommand::List(_) | MachinesCommand::Generations(_)
        ) | TopCommand::Vars(VarsCommand::List(_) | VarsCommand::Get(_) | VarsCommand::Check(_))
            | TopCommand::Completions { .. }
            // It becomes ssh: the user's terminal, never a relay.
            | TopCommand::Ssh(_)
    );
    let relays = changes_hosts.then(clan::output::relay);
    // Commands in hints repeat this run's flake and host overrides.
    let hosts = match &cli.command {
        TopCommand::Completions { .. } => None,
        TopCommand::Ssh(a) => Some(&a.hosts),
        TopCommand::Machines(MachinesCommand::Update(a) | MachinesCommand::Build(a)) => {
            Some(&a.hosts)
        }
        TopCommand::Machines(MachinesCommand::Show(a)) => Some(&a.hosts),
        TopCommand::Machines(MachinesCommand::List(a)) => Some(&a.hosts),
        TopCommand::Machines(MachinesCommand::SetupBuildHost(a)) => Some(&a.hosts),
        TopCommand::Machines(MachinesCommand::SetupCache(a)) => Some(&a.hosts),
        TopCommand::Machines(MachinesCommand::Rollback(a)) => Some(&a.on.hosts),
        TopCommand::Machines(MachinesCommand::Generations(a)) => Some(&a.hosts),
        TopCommand::Vars(VarsCommand::Generate(a)) => Some(&a.hosts),
        TopCommand::Vars(VarsCommand::List(a) | VarsCommand::Check(a)) => Some(&a.hosts),
        TopCommand::Vars(VarsCommand::Get(a) | VarsCommand::Set(a)) => Some(&a.hosts),
        TopCommand::Vars(VarsCommand::Upload(a)) => Some(&a.on.hosts),
        TopCommand::Vars(VarsCommand::Fix(a)) => Some(&a.hosts),
        TopCommand::Vars(VarsCommand::Keygen(a)) => Some(&a.hosts),
    };
    if let Some(hosts) = hosts {
        clan::hint::remember(hosts.hint_context());
    }
    // Ctrl-C: children run in process groups of their own, so clan decides what stops.
    clan::interrupt::install();
    let result = match &cli.command {
        TopCommand::Completions { shell } => clan::commands::completions(*shell),
        TopCommand::Ssh(args) => clan::commands::ssh::run(args),
        TopCommand::Machines(MachinesCommand::Update(args)) => update::run(args),
        TopCommand::Machines(MachinesCommand::Build(args)) => update::build(args),
        TopCommand::Machines(MachinesCommand::Show(args)) => show::run(args),
        TopCommand::Machines(MachinesCommand::List(args)) => list::run(args),
        TopCommand::Machines(MachinesCommand::SetupBuildHost(args)) => setup_build_host::run(args),
        TopCommand::Machines(MachinesCommand::SetupCache(args)) => setup_cache::run(args),
        TopCommand::Machines(MachinesCommand::Rollback(args)) => rollback::run(args),
        TopCommand::Machines(MachinesCommand::Generations(args)) => rollback::generations(args),
        TopCommand::Vars(VarsCommand::Generate(args)) => clan::commands::vars::generate(args),
        TopCommand::Vars(VarsCommand::List(args)) => clan::commands::vars::list(args),
        TopCommand::Vars(VarsCommand::Get(args)) => clan::commands::vars::get(args),
        TopCommand::Vars(VarsCommand::Set(args)) => clan::commands::vars::set(args),
        TopCommand::Vars(VarsCommand::Check(args)) => clan::commands::vars::check(args),
        TopCommand::Vars(VarsCommand::Upload(args)) => clan::commands::vars::upload(args),
        TopCommand::Vars(VarsCommand::Fix(args)) => clan::commands::vars::fix(args),
        TopCommand::Vars(VarsCommand::Keygen(args)) => clan::commands::vars::keygen(args),
    };
    // The one place where how a run ended becomes a number.
    let exit = match result {
        Ok(exit) => exit,
        Err(error) => {
            eprintln!("{error}");
            error.exit
        }
    };
    if let Some(relays) = relays {
        relays.finish();
    }
    std::process::exit(exit.code());
}
