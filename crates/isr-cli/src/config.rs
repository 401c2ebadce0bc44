//! The client's configuration file (TOML): defaults for options that also have an environment variable.
//!
//! Every option of `isr` read from an environment variable `ISR_FOO_BAR` (clap's `env`) can be set in the file
//! as `foo_bar = ...`; the file is read before the command line is parsed and fills in the environment
//! variables that are not set, so a flag wins over the environment, which wins over the file. Options added
//! to the command line with an `env` need nothing here. Which file: `--config FILE`, else `$ISR_CONFIG`, else
//! `$XDG_CONFIG_HOME/isr/config.toml` (`~/.config/isr/config.toml`); a missing default file is no error, a
//! missing named one is. An unknown key, a value of the wrong kind or one the option refuses is a usage error
//! naming the file and the key; a password never goes in the file.

use clap::Command;
use isr_client::ClientError;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// The environment variable that names the configuration file (and `--config` on the command line).
pub const CONFIG_ENV: &str = "ISR_CONFIG";
const PREFIX: &str = "ISR_";

/// Where the configuration file is, and whether the user named it (a named file must exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPath {
    pub path: PathBuf,
    pub explicit: bool,
}

/// The configuration file `args` (the command line, program name first) and `env` select.
pub fn config_path(args: &[OsString], env: impl Fn(&str) -> Option<OsString>) -> Option<ConfigPath> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(|p| ConfigPath { path: PathBuf::from(p), explicit: true });
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(ConfigPath { path: PathBuf::from(p), explicit: true });
        }
    }
    if let Some(p) = env(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Some(ConfigPath { path: PathBuf::from(p), explicit: true });
    }
    let base = match env("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(env("HOME")?).join(".config"),
    };
    Some(ConfigPath { path: base.join("isr").join("config.toml"), explicit: false })
}

/// Every option of `cmd` and its subcommands that reads an `ISR_*` variable, by its configuration key
/// (`ISR_RUNTIME_DIR` is `runtime_dir`), with the subcommand path it belongs to (to validate values).
fn keys(cmd: &Command) -> BTreeMap<String, (String, Vec<String>)> {
    fn walk(cmd: &Command, path: &mut Vec<String>, out: &mut BTreeMap<String, (String, Vec<String>)>) {
        for arg in cmd.get_arguments() {
            let Some(env) = arg.get_env().and_then(OsStr::to_str) else { continue };
            let Some(key) = env.strip_prefix(PREFIX) else { continue };
            if env == CONFIG_ENV {
                continue;
            }
            out.entry(key.to_ascii_lowercase())
                .or_insert_with(|| (arg.get_id().as_str().to_owned(), path.clone()));
        }
        for sub in cmd.get_subcommands() {
            path.push(sub.get_name().to_owned());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut out = BTreeMap::new();
    walk(cmd, &mut Vec::new(), &mut out);
    out
}

/// The configuration keys `cmd` knows, sorted (for the documentation test).
#[cfg(test)]
pub fn known_keys(cmd: &Command) -> Vec<String> {
    keys(cmd).into_keys().collect()
}

fn bad(path: &Path, key: &str, why: impl std::fmt::Display) -> ClientError {
    ClientError::Usage(format!("configuration file {}: key {key}: {why}", path.display()))
}

/// Read and check the file: the `(ISR_* variable, value)` pairs it sets. `Ok(empty)` for a default file that
/// does not exist.
pub fn read(cmd: &Command, at: &ConfigPath) -> Result<Vec<(String, String)>, ClientError> {
    let path = &at.path;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !at.explicit => return Ok(Vec::new()),
        Err(e) => {
            return Err(ClientError::Usage(format!("reading the configuration file {}: {e}", path.display())))
        }
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| ClientError::Usage(format!("configuration file {}: {e}", path.display())))?;
    let mut cmd = cmd.clone();
    cmd.build();
    let known = keys(&cmd);
    let mut out = Vec::new();
    for (key, value) in &table {
        if key.contains("password") {
            return Err(bad(
                path,
                key,
                "a password never goes in the configuration file (it comes from $ISR_PASSWORD or a prompt)",
            ));
        }
        let Some((id, sub)) = known.get(key) else {
            return Err(bad(
                path,
                key,
                format!("unknown key (known keys: {})", known.keys().cloned().collect::<Vec<_>>().join(", ")),
            ));
        };
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(bad(
                    path,
                    key,
                    format!("expected a string, number or boolean, not {}", other.type_str()),
                ))
            }
        };
        // The option's own parser judges the value (the option alone, given the value as a flag), so a bad
        // one is told here with the file and key.
        let mut owner = &cmd;
        for name in sub {
            owner = owner.find_subcommand(name).expect("subcommand found by the walk");
        }
        let arg = owner.get_arguments().find(|a| a.get_id() == id).expect("argument found by the walk");
        if let Some(long) = arg.get_long() {
            let probe = Command::new("isr")
                .no_binary_name(true)
                .disable_help_flag(true)
                .disable_version_flag(true)
                .arg(arg.clone().env(None::<&str>).required(false).global(false));
            if let Err(e) = probe.try_get_matches_from([format!("--{long}={value}")]) {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
                return Err(bad(path, key, first));
            }
        }
        out.push((format!("{PREFIX}{}", key.to_ascii_uppercase()), value));
    }
    Ok(out)
}

/// The settings of `pairs` whose variable `env` does not set (the environment wins over the file).
pub fn unset(pairs: Vec<(String, String)>, env: impl Fn(&str) -> Option<OsString>) -> Vec<(String, String)> {
    pairs.into_iter().filter(|(var, _)| env(var).is_none()).collect()
}

/// Read the configuration file of this command line and set the environment variables it gives that are
/// not set already. Call before any thread starts (it changes the process environment).
pub fn apply(cmd: &Command) -> Result<(), ClientError> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some(at) = config_path(&args, |v| std::env::var_os(v)) else { return Ok(()) };
    for (var, value) in unset(read(cmd, &at)?, |v| std::env::var_os(v)) {
        std::env::set_var(var, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, env = "ISR_TEST_SERVER", global = true)]
        server: Option<String>,
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Run {
            #[arg(long, env = "ISR_TEST_DISPLAY", default_value = "gtk", value_parser = ["none", "gtk"])]
            display: String,
            #[arg(long, env = "ISR_TEST_RATE")]
            rate: Option<u32>,
        },
    }

    fn file(text: &str) -> (tempfile::TempDir, ConfigPath) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        (dir, ConfigPath { path, explicit: true })
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn keys_come_from_the_options_environment_variables() {
        use clap::CommandFactory;
        let keys = known_keys(&Cli::command());
        assert_eq!(keys, ["test_display", "test_rate", "test_server"]);
        // The real command line: every env-backed option is a key, the config file itself is not.
        let real = known_keys(&crate::Cli::command());
        for k in ["server", "user", "home", "ca_cert", "display", "network", "accel", "runtime_dir"] {
            assert!(real.contains(&k.to_owned()), "{k} missing from {real:?}");
        }
        assert!(!real.contains(&"config".to_owned()));
        // Every key is documented in the README's table of configuration keys.
        let readme = include_str!("../../../README.md");
        for k in &real {
            assert!(
                readme.contains(&format!("| `{k}` |")),
                "README.md does not document the configuration key {k}"
            );
        }
    }

    #[test]
    fn which_file() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |v: &str| vars.iter().find(|(k, _)| *k == v).map(|(_, x)| OsString::from(x))
        };
        let home = env(&[("HOME", "/h")]);
        assert_eq!(
            config_path(&args(&["isr", "ls"]), home),
            Some(ConfigPath { path: "/h/.config/isr/config.toml".into(), explicit: false })
        );
        let xdg = env(&[("HOME", "/h"), ("XDG_CONFIG_HOME", "/x"), ("ISR_CONFIG", "/e.toml")]);
        assert_eq!(config_path(&args(&["isr", "ls"]), xdg).unwrap().path, PathBuf::from("/e.toml"));
        let xdg = env(&[("HOME", "/h"), ("XDG_CONFIG_HOME", "/x")]);
        assert_eq!(
            config_path(&args(&["isr", "ls"]), xdg).unwrap().path,
            PathBuf::from("/x/isr/config.toml")
        );
        let flag = env(&[("ISR_CONFIG", "/e.toml")]);
        let p = config_path(&args(&["isr", "--config", "/f.toml", "ls"]), flag).unwrap();
        assert_eq!(p, ConfigPath { path: "/f.toml".into(), explicit: true });
        let p = config_path(&args(&["isr", "ls", "--config=/g.toml"]), no_env).unwrap();
        assert_eq!(p.path, PathBuf::from("/g.toml"));
        // after `--` it is an argument, not the option
        assert!(config_path(&args(&["isr", "--", "--config", "x"]), no_env).is_none());
    }

    #[test]
    fn values_are_checked_by_the_options_parsers() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let (_d, at) = file("test_server = \"http://s:1\"\ntest_display = \"none\"\ntest_rate = 5\n");
        let mut got = read(&cmd, &at).unwrap();
        got.sort();
        assert_eq!(
            got,
            [
                ("ISR_TEST_DISPLAY".to_owned(), "none".to_owned()),
                ("ISR_TEST_RATE".to_owned(), "5".to_owned()),
                ("ISR_TEST_SERVER".to_owned(), "http://s:1".to_owned()),
            ]
        );
        for (text, key, says) in [
            ("nonsense = 1", "nonsense", "unknown key"),
            ("test_display = \"vga\"", "test_display", "vga"),
            ("test_rate = \"fast\"", "test_rate", "fast"),
            ("test_rate = [1]", "test_rate", "expected a string"),
            ("password = \"x\"", "password", "never"),
        ] {
            let (_d, at) = file(text);
            let e = read(&cmd, &at).unwrap_err();
            assert!(matches!(e, ClientError::Usage(_)), "{e}");
            let e = e.to_string();
            assert!(e.contains(&at.path.display().to_string()), "{e}");
            assert!(e.contains(&format!("key {key}")) && e.contains(says), "{e}");
        }
        let (_d, at) = file("not toml [");
        assert!(matches!(read(&cmd, &at), Err(ClientError::Usage(_))));
        // a missing default file is nothing; a missing named one is an error
        let missing = ConfigPath { path: "/nonexistent/isr/config.toml".into(), explicit: false };
        assert!(read(&cmd, &missing).unwrap().is_empty());
        let named = ConfigPath { explicit: true, ..missing };
        assert!(matches!(read(&cmd, &named), Err(ClientError::Usage(_))));
    }

    #[test]
    fn flags_win_over_the_environment_which_wins_over_the_file() {
        use clap::{CommandFactory, FromArgMatches};
        let (_d, at) = file("test_server = \"http://file\"\ntest_display = \"none\"\ntest_rate = 7\n");
        let pairs = read(&Cli::command(), &at).unwrap();
        // ISR_TEST_SERVER is in the environment: the file's value is not used.
        let env = |v: &str| (v == "ISR_TEST_SERVER").then(|| OsString::from("http://env"));
        let kept = unset(pairs, env);
        assert_eq!(
            kept.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(),
            ["ISR_TEST_DISPLAY", "ISR_TEST_RATE"]
        );
        // Applied as the binary does, then parsed: a flag beats both (these variables exist only in this test).
        std::env::set_var("ISR_TEST_SERVER", "http://env");
        for (var, value) in &kept {
            std::env::set_var(var, value);
        }
        let parse =
            |a: &[&str]| Cli::from_arg_matches(&Cli::command().try_get_matches_from(a).unwrap()).unwrap();
        let cli = parse(&["t", "run"]);
        assert_eq!(cli.server.as_deref(), Some("http://env"));
        let Cmd::Run { display, rate } = cli.cmd;
        assert_eq!((display.as_str(), rate), ("none", Some(7)));
        let cli = parse(&["t", "--server", "http://flag", "run", "--display", "gtk", "--rate", "9"]);
        assert_eq!(cli.server.as_deref(), Some("http://flag"));
        let Cmd::Run { display, rate } = cli.cmd;
        assert_eq!((display.as_str(), rate), ("gtk", Some(9)));
        for var in ["ISR_TEST_SERVER", "ISR_TEST_DISPLAY", "ISR_TEST_RATE"] {
            std::env::remove_var(var);
        }
    }
}
