//! The link between two nodes during a live migration: one SSH connection per migration.
//!
//! The VMMs migrate the guest (thvc-vmm's `persist::outgoing` and `--incoming`); the agents
//! give them their stream and move the VM object with it. Why SSH and not TLS with node
//! certificates: the control plane already reaches every node over SSH with keys the
//! operator manages (thvcctl, systemd-stdio-bridge), sshd is on every node and audited, and
//! an SSH account whose forced command is the receiver can do exactly one thing. A second
//! PKI for node certificates would be one more secret store to run for the same guarantee.
//!
//! * Source: the agent runs `ssh -F <ssh_config> -T -- TARGET migrate-receive` with its
//!   stdin and stdout on one end of a socketpair, writes the header line ([`Header`]: the
//!   VM's name and spec) into the other end and hands that end to its VMM's `migrate`.
//!   The ssh_config names the account (`thvc-migrate`), the key and the known hosts.
//! * Target: sshd runs the account's forced command `thvc-nodeagent migrate-receive`, which
//!   reads the header, passes one end of a socketpair to its agent's `ReceiveVm` (D-Bus,
//!   a file descriptor) and carries its stdin and stdout to the other ([`carry_stdio`]):
//!   the agent creates the VM, starts a VMM with `--incoming` and [`relay`]s between the
//!   socket and that VMM until the guest runs there, then shuts the socket down.
//!
//! Whatever fails before the switch, the source VMM keeps its guest running (the VMM's
//! protocol: the source stops only once the target said it resumed).

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The header's version: a receiver refuses others.
pub const HEADER_VERSION: u32 = 1;
/// The longest header line (a spec is far smaller; cloud-init user data is bounded too).
pub const HEADER_MAX: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("invalid target node {0:?}: expected a host name or address")]
    BadTarget(String),
    #[error("reading the migration header: {0}")]
    Read(#[source] io::Error),
    #[error("the migration header is invalid: {0}")]
    BadHeader(String),
    #[error("relaying the migration stream: {0}")]
    Relay(#[source] io::Error),
}

/// What precedes the VMM's stream on the link: which VM comes, with the spec it has on the
/// source (its UUID, MACs, disks on shared storage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub thvc_migration: u32,
    pub name: String,
    pub spec: String,
}

impl Header {
    pub fn new(name: &str, spec: &str) -> Header {
        Header {
            thvc_migration: HEADER_VERSION,
            name: name.to_owned(),
            spec: spec.to_owned(),
        }
    }

    /// The header as one line.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Reads the header line from `input` one byte at a time: nothing after the newline is
    /// consumed, so the VMM's stream that follows stays in `input`.
    pub fn read_from(input: &mut impl Read) -> Result<Header, MigrationError> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match input.read(&mut byte) {
                Ok(0) => {
                    return Err(MigrationError::BadHeader(format!(
                        "the connection ended after {} bytes, before the header's end",
                        line.len()
                    )))
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() >= HEADER_MAX => {
                    return Err(MigrationError::BadHeader(format!(
                        "longer than {HEADER_MAX} bytes"
                    )))
                }
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MigrationError::Read(e)),
            }
        }
        let header: Header = serde_json::from_slice(&line)
            .map_err(|e| MigrationError::BadHeader(format!("not a migration header: {e}")))?;
        if header.thvc_migration != HEADER_VERSION {
            return Err(MigrationError::BadHeader(format!(
                "version {} (this node speaks {HEADER_VERSION})",
                header.thvc_migration
            )));
        }
        Ok(header)
    }
}

/// A target node as ssh takes it: a host name or address, never an option.
pub fn check_target(target: &str) -> Result<(), MigrationError> {
    let valid = !target.is_empty()
        && target.len() <= 253
        && !target.starts_with('-')
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]%".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(MigrationError::BadTarget(target.to_owned()))
    }
}

/// How this node reaches others: ssh with a configuration of its own (which account, key
/// and known hosts; see the README, "Live migration between nodes").
#[derive(Debug, Clone)]
pub struct SshLink {
    pub ssh: PathBuf,
    pub config: PathBuf,
}

impl SshLink {
    /// ssh to `target` with `stream` as its stdin and stdout; stderr piped (what the
    /// target said when it refused).
    pub fn command(&self, target: &str, stream: OwnedFd) -> io::Result<tokio::process::Command> {
        check_target(target).map_err(io::Error::other)?;
        let mut cmd = tokio::process::Command::new(&self.ssh);
        cmd.arg("-F")
            .arg(&self.config)
            .args(["-T", "-o", "BatchMode=yes", "--", target, "migrate-receive"])
            .stdin(std::process::Stdio::from(stream.try_clone()?))
            .stdout(std::process::Stdio::from(stream))
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        Ok(cmd)
    }
}

/// Carries the link (`link`: the receiver's socket) to and from the VMM's incoming
/// connection `vmm` until both directions ended (each end passes on to the other side);
/// returns the bytes carried each way. Then the link is shut down, not only closed: a copy
/// of its descriptor elsewhere (the bus message that brought it) cannot keep the receiver,
/// and so the SSH session, waiting.
pub async fn relay(
    link: std::os::unix::net::UnixStream,
    vmm: tokio::net::UnixStream,
) -> Result<(u64, u64), MigrationError> {
    let ender = link.try_clone().map_err(MigrationError::Relay)?;
    link.set_nonblocking(true).map_err(MigrationError::Relay)?;
    let mut link = tokio::net::UnixStream::from_std(link).map_err(MigrationError::Relay)?;
    let mut vmm = vmm;
    let carried =
        tokio::io::copy_bidirectional_with_sizes(&mut link, &mut vmm, RELAY_BUFFER, RELAY_BUFFER)
            .await
            .map_err(MigrationError::Relay);
    let _ = ender.shutdown(std::net::Shutdown::Both);
    carried
}

const RELAY_BUFFER: usize = 256 << 10;

/// Copies until `from` ends, with plain reads and writes: not `io::copy`, whose splice(2)
/// between a pipe and a socket is a path this link need not depend on.
fn pump(from: &mut impl Read, to: &mut impl io::Write) -> io::Result<u64> {
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// The receiver's side (`migrate-receive`): carries its stdin (after the header) and stdout,
/// which sshd may give as pipes, to and from `link`, a socket whose other end went to the
/// agent. Returns when the agent shut the link down (the VMM's last words are out) or
/// `limit` passed; the stdin direction runs until the process exits.
pub fn carry_stdio(
    stdin: std::fs::File,
    stdout: std::fs::File,
    link: &std::os::unix::net::UnixStream,
    limit: std::time::Duration,
) -> io::Result<()> {
    let (mut to_link, mut from_link) = (link.try_clone()?, link.try_clone()?);
    std::thread::spawn(move || {
        let mut stdin = stdin;
        let _ = pump(&mut stdin, &mut to_link);
        let _ = to_link.shutdown(std::net::Shutdown::Write);
    });
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let copied = pump(&mut from_link, &mut stdout);
        let _ = done.send(copied);
    });
    match finished.recv_timeout(limit) {
        Ok(copied) => copied.map(drop),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the agent did not end the link",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_header_is_read_up_to_its_newline_and_no_further() {
        let header = Header::new("web", r#"{"vcpus":1}"#);
        let mut wire = header.line();
        wire.extend_from_slice(b"VMM stream");
        let mut input = io::Cursor::new(wire);
        assert_eq!(Header::read_from(&mut input).unwrap(), header);
        let mut rest = String::new();
        Read::read_to_string(&mut input, &mut rest).unwrap();
        assert_eq!(rest, "VMM stream");
    }

    #[test]
    fn bad_headers_are_refused_with_what_is_wrong() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "before the header's end"),
            (b"hello\n", "not a migration header"),
            (
                br#"{"thvc_migration":2,"name":"a","spec":"{}"}
"#,
                "version 2",
            ),
            (
                br#"{"thvc_migration":1,"name":"a","spec":"{}","x":1}
"#,
                "unknown field",
            ),
        ];
        for (wire, want) in cases {
            let e = Header::read_from(&mut io::Cursor::new(wire.to_vec())).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        let endless = vec![b'x'; HEADER_MAX + 10];
        let e = Header::read_from(&mut io::Cursor::new(endless)).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[test]
    fn targets_are_host_names_or_addresses_never_options() {
        for ok in [
            "node2",
            "node2.dc1.example",
            "10.0.0.2",
            "[fd00::2]",
            "fe80::1%eth0",
        ] {
            check_target(ok).unwrap();
        }
        for bad in [
            "",
            "-oProxyCommand=x",
            "a b",
            "a;b",
            "$(x)",
            &"a".repeat(254),
        ] {
            assert!(check_target(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_relay_carries_both_ways_and_shuts_the_link_down() {
        // The receiver's socket (its stdin and stdout through carry_stdio) and the VMM's.
        let (receiver, agent_side) = std::os::unix::net::UnixStream::pair().unwrap();
        // A copy of the agent's descriptor that is never closed, as a bus message may keep.
        let lingering = agent_side.try_clone().unwrap();
        let (vmm, vmm_agent_side) = tokio::net::UnixStream::pair().unwrap();
        let relay = tokio::spawn(relay(agent_side, vmm_agent_side));
        let source = std::thread::spawn(move || {
            let mut w = receiver.try_clone().unwrap();
            std::io::Write::write_all(&mut w, &vec![7u8; 3 << 20]).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            Read::read_to_string(&mut &receiver, &mut answer).unwrap();
            answer
        });
        let (mut vmm_read, mut vmm_write) = vmm.into_split();
        let mut got = Vec::new();
        vmm_read.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 3 << 20);
        assert!(got.iter().all(|&b| b == 7));
        vmm_write.write_all(b"resumed").await.unwrap();
        drop(vmm_write);
        let (inbound, outbound) = relay.await.unwrap().unwrap();
        assert_eq!((inbound, outbound), (3 << 20, 7));
        // The receiver read to its end although `lingering` is still open.
        assert_eq!(source.join().unwrap(), "resumed");
        drop(lingering);
    }

    #[test]
    fn the_receiver_carries_pipes_until_the_agent_ends_the_link() {
        let (stdin_read, stdin_write) = nix::unistd::pipe().unwrap();
        let (stdout_read, stdout_write) = nix::unistd::pipe().unwrap();
        let (link, agent) = std::os::unix::net::UnixStream::pair().unwrap();
        let agent_thread = std::thread::spawn(move || {
            let mut got = [0u8; 5];
            (&agent).read_exact(&mut got).unwrap();
            std::io::Write::write_all(&mut &agent, b"ok").unwrap();
            agent.shutdown(std::net::Shutdown::Both).unwrap();
            got
        });
        std::io::Write::write_all(&mut std::fs::File::from(stdin_write), b"hello").unwrap();
        carry_stdio(
            std::fs::File::from(stdin_read),
            std::fs::File::from(stdout_write),
            &link,
            std::time::Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(&agent_thread.join().unwrap(), b"hello");
        let mut out = String::new();
        Read::read_to_string(&mut std::fs::File::from(stdout_read), &mut out).unwrap();
        assert_eq!(out, "ok");
    }
}
