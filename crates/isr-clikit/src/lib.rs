//! What the `isr` and `isr-server` binaries share about their command lines: the hidden `BIN man --output
//! DIR` (for `make man`) and the shell completions, both generated from the binary's clap definition.
//!
//! A crate of its own rather than a module of `isr-wire`: it is about command lines (clap, clap_mangen,
//! clap_complete), which the wire contract has nothing to do with, and a library used by both binaries
//! that depend on neither's crate (`isr-cli` does not link `isr-server`, and the other way round).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `BIN man --output DIR` with `args` the words after `man`: writes one man page per command and
/// subcommand of `command` (`BIN.1`, `BIN-SUBCOMMAND.1`, ...) into DIR. It is not part of the binary's
/// clap definition, so neither its completions nor its man pages list it. Errors go to stderr as
/// `BIN: error: ...`: exit 2 for bad usage, 1 when the pages cannot be written.
pub fn man_main(command: clap::Command, args: &[OsString]) -> ExitCode {
    let bin = command.get_name().to_owned();
    let man = clap::Command::new("man")
        .bin_name(format!("{bin} man"))
        .no_binary_name(true)
        .about(format!("Write the man pages of {bin} ({bin}.1, {bin}-SUBCOMMAND.1) into DIR"))
        .arg(
            clap::Arg::new("output")
                .long("output")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        );
    let m = match man.try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let dir = m.get_one::<PathBuf>("output").expect("required");
    match write_man_pages(command, dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bin}: error: writing man pages into {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

/// Write one man page per command and subcommand of `command` into `dir` (created if missing).
pub fn write_man_pages(command: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(command, dir)
}

/// A shell the completions are not written for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownShell(pub String);

impl std::fmt::Display for UnknownShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no completions for the shell {:?}", self.0)
    }
}

impl std::error::Error for UnknownShell {}

/// The shells completions are written for, as `BIN completions SHELL` names them.
pub const SHELLS: [&str; 3] = ["bash", "zsh", "fish"];

/// Print the completion script of `command` for `shell` (bash, zsh or fish) on `out`.
pub fn completions(
    mut command: clap::Command,
    shell: &str,
    out: &mut dyn std::io::Write,
) -> Result<(), UnknownShell> {
    use clap_complete::Shell;
    let shell = match shell {
        "bash" => Shell::Bash,
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        other => return Err(UnknownShell(other.to_owned())),
    };
    let name = command.get_name().to_owned();
    clap_complete::generate(shell, &mut command, name, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo").about("a demo").subcommand(clap::Command::new("run").about("runs"))
    }

    #[test]
    fn one_page_per_command_and_the_man_words_themselves_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man");
        let code = man_main(demo(), &["--output".into(), out.clone().into_os_string()]);
        assert_eq!(code, ExitCode::SUCCESS);
        let mut pages: Vec<_> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        pages.sort();
        assert_eq!(pages, ["demo-run.1", "demo.1"]);
        assert_eq!(man_main(demo(), &[]), ExitCode::from(2));
    }

    #[test]
    fn completions_for_known_shells_only() {
        for shell in SHELLS {
            let mut out = Vec::new();
            completions(demo(), shell, &mut out).unwrap();
            assert!(String::from_utf8(out).unwrap().contains("demo"), "{shell}");
        }
        let e = completions(demo(), "tcsh", &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "no completions for the shell \"tcsh\"");
    }
}
