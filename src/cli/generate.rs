//! Shell completions and man pages, generated from the clap definitions so they never drift
//! from the parser: `ciphershard completions bash > /etc/bash_completion.d/ciphershard`,
//! `ciphershard man > ciphershard.1`, `ciphershard man convert > ciphershard-convert.1`.

#![forbid(unsafe_code)]

use clap::CommandFactory;

use ciphershard::error::{Error, Result};

use super::{Cli, output};

/// The completion script for `shell`, on standard output.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    // Rendered into memory first: the generators panic on a write error, a closed pipe included.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    output::bytes(&script)
}

/// Why `name` has no man page: it is not a subcommand (clap's own `help` has none either).
pub fn unknown_subcommand(name: &str) -> Option<String> {
    let cmd = Cli::command();
    let names: Vec<&str> = cmd
        .get_subcommands()
        .map(|s| s.get_name())
        .filter(|n| *n != "help")
        .collect();
    (!names.contains(&name)).then(|| {
        format!(
            "no subcommand '{name}' (choose one of: {})",
            names.join(", ")
        )
    })
}

/// The man page (roff) of the whole tool, or of one subcommand, on standard output.
pub fn man(subcommand: Option<&str>) -> Result<()> {
    let mut cmd = Cli::command();
    cmd.build();
    let page = match subcommand {
        None => cmd,
        Some(name) => {
            if let Some(why) = unknown_subcommand(name) {
                return Err(Error::InvalidArgument(why));
            }
            let sub = cmd.find_subcommand(name).cloned().expect("checked above");
            // The page's title and synopsis read `ciphershard-convert` / `ciphershard convert`.
            sub.name(format!("ciphershard-{name}"))
                .bin_name(format!("ciphershard {name}"))
                .version(env!("CARGO_PKG_VERSION"))
        }
    };
    let mut roff = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut roff)
        .map_err(|e| Error::io("<man page>", e))?;
    output::bytes(&roff)
}
