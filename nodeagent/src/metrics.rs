//! The Prometheus text exposition format, and publishing it as a file.
//!
//! The agent does not listen on the network (its unit allows only D-Bus and the VMMs'
//! sockets locally, and it would be one more port to secure); the host's
//! prometheus-node-exporter already does, and its textfile collector
//! (`--collector.textfile.directory`) exports every `*.prom` file of a directory. So the
//! agent writes one there ([`write_file`]: a temporary sibling renamed over it, so the
//! collector never reads half a file) and node-exporter serves it with its own series.
//! What the series are and where they come from is `node::metrics`; this module only knows
//! the format (version 0.0.4: `# HELP`, `# TYPE`, `name{label="value"} number`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::fsutil;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("{path} has no parent directory")]
    NoParent { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fs(#[from] fsutil::FsError),
}

/// Prometheus metric types the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until the process that counts restarts); the name ends in `_total`.
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One metric family: its name, help text, type and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

/// One sample: label pairs (in this order) and a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Family {
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample. Counts up to 2^53 are exact in an f64 (8 PiB of disk traffic), which
    /// is also all Prometheus keeps.
    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push(Sample { labels, value });
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and newline escaped (quotes are allowed there).
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A value as the text format writes it (Go's ParseFloat syntax: `NaN`, `+Inf`, `-Inf`).
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        // Display of f64: "3", "0.25", no exponent; exact for integers up to 2^53.
        format!("{v}")
    }
}

/// The families in the text format, each with its `# HELP` and `# TYPE` lines (also when it
/// has no samples, so a scrape shows what the agent could report).
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
        for s in &f.samples {
            out.push_str(f.name);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", format_value(s.value));
        }
    }
    out
}

/// Replaces `target` with `text`: a temporary sibling (a dot name that does not end in
/// `.prom`, which the textfile collector skips), mode 0644 whatever the umask (the collector
/// runs as another user), renamed over it. Not fsynced: the file is rewritten every few
/// seconds and lives in /run. Creates the directory (0755). Blocking.
pub fn write_file(target: &Path, text: &str) -> Result<(), MetricsError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = target.parent().ok_or_else(|| MetricsError::NoParent {
        path: target.to_owned(),
    })?;
    if !dir.as_os_str().is_empty() && !dir.is_dir() {
        fsutil::create_dir_all(dir, 0o755)?;
        // The umask may have taken bits the collector needs.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(
            |source| MetricsError::Io {
                op: "chmod",
                path: dir.to_owned(),
                source,
            },
        )?;
    }
    let tmp = fsutil::temp_sibling(target)?;
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| MetricsError::Io { op, path, source }
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod", &tmp))?;
        f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, target).map_err(io("rename into place", target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_and_escaped_labels() {
        let mut info = Family::new("thvc_vm_info", Kind::Gauge, "A VM \\ its \"facts\"\nhere.");
        info.push(
            vec![
                ("vm", "a\\b\"c\nd".to_owned()),
                ("state", "running".to_owned()),
            ],
            1.0,
        );
        let mut cpu = Family::new("thvc_vm_cpu_seconds_total", Kind::Counter, "CPU time.");
        cpu.push(vec![("vm", "web".to_owned())], 12.25);
        let empty = Family::new("thvc_vms", Kind::Gauge, "VMs.");
        let mut bare = Family::new("thvc_up", Kind::Gauge, "Up.");
        bare.push(vec![], f64::NAN);
        bare.push(vec![], 1e15);
        assert_eq!(
            render(&[info, cpu, empty, bare]),
            "# HELP thvc_vm_info A VM \\\\ its \"facts\"\\nhere.\n\
             # TYPE thvc_vm_info gauge\n\
             thvc_vm_info{vm=\"a\\\\b\\\"c\\nd\",state=\"running\"} 1\n\
             # HELP thvc_vm_cpu_seconds_total CPU time.\n\
             # TYPE thvc_vm_cpu_seconds_total counter\n\
             thvc_vm_cpu_seconds_total{vm=\"web\"} 12.25\n\
             # HELP thvc_vms VMs.\n\
             # TYPE thvc_vms gauge\n\
             # HELP thvc_up Up.\n\
             # TYPE thvc_up gauge\n\
             thvc_up NaN\n\
             thvc_up 1000000000000000\n"
        );
    }

    #[test]
    fn escapes_only_what_the_format_says() {
        assert_eq!(escape_label_value("plain-name_1.x"), "plain-name_1.x");
        assert_eq!(escape_label_value("\\"), "\\\\");
        assert_eq!(escape_label_value("\""), "\\\"");
        assert_eq!(escape_label_value("\n"), "\\n");
        assert_eq!(escape_label_value("tab\there 'ü'"), "tab\there 'ü'");
    }

    #[test]
    fn writes_atomically_with_mode_0644_and_creates_the_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("metrics/thvc.prom");
        write_file(&target, "a 1\n").unwrap();
        write_file(&target, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "a 2\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), 0o644);
        assert_eq!(mode(target.parent().unwrap()), 0o755);
        let names: Vec<_> = std::fs::read_dir(target.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["thvc.prom"], "no temporary file left");
    }
}
