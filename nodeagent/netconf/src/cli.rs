//! `net plan|apply|show` for the node agent's binary and the `thvc-netconf` tool.

use std::io::{Read, Write};
use std::path::PathBuf;

use crate::document::{parse_document, Document};
use crate::netconf::{Netconf, NetconfError};

/// Where the ownership file lives unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/thvc/net";

pub const USAGE: &str = "\
usage: net [--state-dir DIR] [--json] plan FILE    show the changes apply would make
       net [--state-dir DIR] [--json] apply FILE   apply the document, print what changed
       net [--state-dir DIR] show                  print the current state as a document
FILE may be - for standard input. --state-dir defaults to /var/lib/thvc/net.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetAction {
    Plan { document: PathBuf },
    Apply { document: PathBuf },
    Show,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetCommand {
    pub action: NetAction,
    pub state_dir: PathBuf,
    /// Print plans and reports as JSON instead of the human diff.
    pub json: bool,
}

impl NetCommand {
    /// Parses the arguments that follow `net` (or the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<NetCommand, NetconfError> {
        let usage = |problem: String| NetconfError::Usage(format!("{problem}\n{USAGE}"));
        let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        let mut json = false;
        let mut positional = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--state-dir" => {
                    state_dir = args
                        .next()
                        .map(PathBuf::from)
                        .ok_or_else(|| usage("--state-dir needs a directory".into()))?;
                }
                "--json" => json = true,
                "-h" | "--help" => return Err(NetconfError::Usage(USAGE.into())),
                flag if flag.starts_with("--") => {
                    return Err(usage(format!("unknown option {flag}")));
                }
                _ => positional.push(arg),
            }
        }
        let action = match positional.as_slice() {
            [verb, file] if verb == "plan" => NetAction::Plan {
                document: PathBuf::from(file),
            },
            [verb, file] if verb == "apply" => NetAction::Apply {
                document: PathBuf::from(file),
            },
            [verb] if verb == "show" => NetAction::Show,
            [] => return Err(usage("missing command".into())),
            other => return Err(usage(format!("cannot understand {:?}", other.join(" ")))),
        };
        Ok(NetCommand {
            action,
            state_dir,
            json,
        })
    }
}

fn read_document(path: &PathBuf) -> Result<Document, NetconfError> {
    let mut text = String::new();
    let display = path.display().to_string();
    let result = if display == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    result.map_err(|source| NetconfError::ReadDocument {
        path: display,
        source,
    })?;
    Ok(parse_document(&text)?)
}

/// Runs one command, printing its result on standard output.
pub async fn run_cli(command: NetCommand) -> Result<(), NetconfError> {
    let output = match &command.action {
        NetAction::Plan { document } => {
            let doc = read_document(document)?;
            let plan = Netconf::new(&command.state_dir).await?.plan(&doc).await?;
            if command.json {
                plan.to_json_pretty()
            } else {
                plan.to_string()
            }
        }
        NetAction::Apply { document } => {
            let doc = read_document(document)?;
            let report = Netconf::new(&command.state_dir).await?.apply(&doc).await?;
            if command.json {
                serde_json::to_string_pretty(&report)
                    .map_err(|e| NetconfError::Internal(e.to_string()))?
            } else {
                report.to_string()
            }
        }
        NetAction::Show => Netconf::new(&command.state_dir)
            .await?
            .show()
            .await?
            .to_json_pretty(),
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not worth an error.
    let _ = writeln!(stdout, "{}", output.trim_end());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<NetCommand, NetconfError> {
        NetCommand::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse(&["plan", "net.json"]).unwrap(),
            NetCommand {
                action: NetAction::Plan {
                    document: "net.json".into()
                },
                state_dir: DEFAULT_STATE_DIR.into(),
                json: false
            }
        );
        let apply = parse(&["--state-dir", "/tmp/x", "--json", "apply", "-"]).unwrap();
        assert_eq!(apply.state_dir, PathBuf::from("/tmp/x"));
        assert!(apply.json);
        assert_eq!(parse(&["show"]).unwrap().action, NetAction::Show);
        for bad in [
            &[][..],
            &["plan"],
            &["show", "x"],
            &["--state-dir"],
            &["--frob", "show"],
            &["destroy", "x"],
        ] {
            assert!(matches!(parse(bad), Err(NetconfError::Usage(_))), "{bad:?}");
        }
    }
}
