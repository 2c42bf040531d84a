//! `--config FILE.toml`: a TOML file whose keys mirror the invoked command's flags (`min_history`
//! or `min-history` for `--min-history`; positional arguments by name, e.g. `src`). Its values become
//! the defaults of those flags, so anything given on the command line still wins.

use anyhow::{bail, Context, Result};
use clap::Command;
use std::ffi::OsString;
use std::path::PathBuf;

/// Finds `--config FILE` / `--config=FILE` in the raw arguments.
fn config_path(args: &[OsString]) -> Result<Option<PathBuf>> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            let v = it.next().context("--config needs a file path")?;
            return Ok(Some(PathBuf::from(v)));
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(v)));
        }
    }
    Ok(None)
}

/// The names of the subcommands in `args` (e.g. `["data", "prepare"]`).
fn subcommand_path(cmd: &Command, args: &[OsString]) -> Vec<String> {
    let mut path = Vec::new();
    let mut cur = cmd.clone();
    for a in args.iter().skip(1) {
        let s = a.to_string_lossy();
        if let Some(sub) = cur.find_subcommand(s.as_ref()) {
            path.push(sub.get_name().to_string());
            cur = sub.clone();
        }
    }
    path
}

fn toml_to_strings(key: &str, v: &toml::Value) -> Result<Vec<String>> {
    Ok(match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(a) => {
            let mut out = Vec::new();
            for x in a {
                out.extend(toml_to_strings(key, x)?);
            }
            out
        }
        other => bail!("key `{key}`: expected a string, number, boolean or array, found {other}"),
    })
}

fn apply(
    cmd: Command,
    path: &[String],
    full: &str,
    table: &toml::Table,
    file: &std::path::Path,
) -> Result<Command> {
    if let Some((first, rest)) = path.split_first() {
        let sub = cmd
            .find_subcommand(first)
            .cloned()
            .expect("subcommand found earlier");
        let sub = apply(sub, rest, full, table, file)?;
        return Ok(cmd.mut_subcommand(first, |_| sub));
    }
    let mut cmd = cmd;
    for (key, value) in table {
        let id = key.replace('-', "_");
        let known = cmd.get_arguments().find(|a| {
            a.get_id().as_str() == id
                || a.get_long().map(|l| l.replace('-', "_")) == Some(id.clone())
        });
        let Some(arg) = known else {
            let names: Vec<String> = cmd
                .get_arguments()
                .filter(|a| {
                    a.get_id() != "config" && a.get_id() != "help" && a.get_id() != "version"
                })
                .map(|a| a.get_id().to_string())
                .collect();
            bail!(
                "{}: unknown key `{key}` for `llara {}`; expected one of: {}",
                file.display(),
                full,
                names.join(", ")
            );
        };
        let arg_id = arg.get_id().clone();
        let values = toml_to_strings(key, value).with_context(|| file.display().to_string())?;
        let is_flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        // A value from the file satisfies a required flag; the command line still overrides it.
        cmd = cmd.mut_arg(arg_id, |a| {
            let a = a.required(false);
            if is_flag {
                a.default_value(values[0].clone())
            } else {
                a.default_values(values)
            }
        });
    }
    Ok(cmd)
}

/// The command with defaults taken from `--config`, if one was given.
pub fn command_with_config(cmd: Command, args: &[OsString]) -> Result<Command> {
    let Some(file) = config_path(args)? else {
        return Ok(cmd);
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading --config {}", file.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("--config {}: not valid TOML", file.display()))?;
    let path = subcommand_path(&cmd, args);
    if path.is_empty() {
        bail!("--config needs a command (e.g. `llara data prepare --config FILE`)");
    }
    apply(cmd, &path, &path.join(" "), &table, &file)
}
