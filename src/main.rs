use clap::Parser;

use clan::cli::{Cli, MachinesCommand, TopCommand};
use clan::commands::machines::update;

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        TopCommand::Machines(MachinesCommand::Update(args)) => update::run(args),
    };
    let code = match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{error}");
            error.exit as i32
        }
    };
    std::process::exit(code);
}
