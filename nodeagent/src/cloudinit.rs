//! cloud-init metadata of a VM (the spec's `metadata`) and the three documents of its
//! NoCloud seed: `meta-data`, `user-data` and `network-config`. [`crate::seed`] puts them on
//! a FAT volume labelled `cidata`, which cloud-init's NoCloud data source finds by label.
//!
//! Every document the agent generates is JSON: JSON is YAML, cloud-init parses these files
//! with a YAML loader, and serde_json's output needs no hand-made quoting (a hostname or
//! key cannot break out of its string). `user-data` is the client's text, verbatim, when
//! given; otherwise `#cloud-config` followed by a JSON object.
//!
//! SSH keys go into `meta-data`'s `public-keys`, which NoCloud reads as the instance's keys
//! (cloud-init installs them for the default user), so a client's own `user_data` is never
//! rewritten to merge them in. Without `user_data` the generated `#cloud-config` lists them
//! as `ssh_authorized_keys` as well (cloud-init de-duplicates keys it installs).
//!
//! Network settings match NICs by MAC address, so the guest's interface names do not
//! matter. `network[i]` configures `nics[i]`; a NIC without an entry uses DHCP (IPv4), the
//! way cloud-init configures a NIC it knows nothing about.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use thiserror::Error;

/// Largest total of the three seed documents; the FAT volume has room for more, but a seed
/// is configuration, not a way to ship payloads into a guest.
pub const MAX_SEED_BYTES: usize = 64 * 1024;
/// Most nameservers per NIC (glibc's resolver uses three; netplan accepts more).
pub const MAX_NAMESERVERS: usize = 8;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_SSH_KEYS: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CloudInitError {
    #[error("metadata.{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(
        "the cloud-init seed would hold {bytes} bytes (meta-data, user-data and \
         network-config together); at most {MAX_SEED_BYTES} are allowed"
    )]
    TooLarge { bytes: usize },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> CloudInitError {
    CloudInitError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The spec's `metadata`: what cloud-init in the guest is told.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// `local-hostname`; default the VM name (which must then be a valid host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// The guest's `user-data`, verbatim (`#cloud-config ...`, a script, MIME multipart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Per NIC, by index into the spec's `nics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NicNetwork>,
}

/// Network settings of one NIC. `dhcp` and static `addresses` may be combined; an entry
/// with neither brings the NIC up without addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicNetwork {
    /// DHCPv4.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dhcp: bool,
    /// `ADDRESS/PREFIX`, IPv4 or IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Default route; needs a static address of the same family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// The documents of a NoCloud seed, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    /// Absent for a VM without NICs (nothing to configure).
    pub network_config: Option<String>,
}

impl SeedFiles {
    /// (file name, content) of every document, in a fixed order.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut v = vec![
            ("meta-data", self.meta_data.as_str()),
            ("user-data", self.user_data.as_str()),
        ];
        if let Some(n) = &self.network_config {
            v.push(("network-config", n.as_str()));
        }
        v
    }

    pub fn total_bytes(&self) -> usize {
        self.files().iter().map(|(_, c)| c.len()).sum()
    }
}

/// Validates `md` and renders the seed of VM `vm` with SMBIOS UUID `uuid` (its
/// instance-id) and NIC MAC addresses `macs` (in NIC order).
pub fn render(
    md: &Metadata,
    vm: &str,
    uuid: &str,
    macs: &[String],
) -> Result<SeedFiles, CloudInitError> {
    let hostname = match &md.hostname {
        Some(h) => {
            validate_hostname(h).map_err(|r| invalid("hostname", format!("{h:?} {r}")))?;
            h.clone()
        }
        None => {
            validate_hostname(vm).map_err(|r| {
                invalid(
                    "hostname",
                    format!(
                        "is required: the VM name {vm:?}, the default, {r} (letters, digits \
                         and '-' in dot-separated labels)"
                    ),
                )
            })?;
            vm.to_owned()
        }
    };
    if md.ssh_authorized_keys.len() > MAX_SSH_KEYS {
        return Err(invalid(
            "ssh_authorized_keys",
            format!("at most {MAX_SSH_KEYS} keys are allowed"),
        ));
    }
    for (i, key) in md.ssh_authorized_keys.iter().enumerate() {
        validate_ssh_key(key).map_err(|r| invalid(format!("ssh_authorized_keys[{i}]"), r))?;
    }
    if md.network.len() > macs.len() {
        return Err(invalid(
            "network",
            format!(
                "has {} entries but the VM has {} nics (network[i] configures nics[i])",
                md.network.len(),
                macs.len()
            ),
        ));
    }

    let mut meta = Map::new();
    meta.insert("instance-id".into(), json!(uuid));
    meta.insert("local-hostname".into(), json!(hostname));
    if !md.ssh_authorized_keys.is_empty() {
        meta.insert("public-keys".into(), json!(md.ssh_authorized_keys));
    }
    let user_data = match &md.user_data {
        Some(u) => u.clone(),
        None => {
            let mut cc = Map::new();
            cc.insert("hostname".into(), json!(hostname));
            if !md.ssh_authorized_keys.is_empty() {
                cc.insert("ssh_authorized_keys".into(), json!(md.ssh_authorized_keys));
            }
            format!("#cloud-config\n{}\n", to_json(Value::Object(cc)))
        }
    };
    let network_config = if macs.is_empty() {
        None
    } else {
        let mut ethernets = Map::new();
        for (i, mac) in macs.iter().enumerate() {
            let eth = match md.network.get(i) {
                Some(n) => nic_config(i, n, mac)?,
                None => json!({"match": {"macaddress": mac}, "dhcp4": true}),
            };
            ethernets.insert(format!("nic{i}"), eth);
        }
        Some(format!(
            "{}\n",
            to_json(json!({"version": 2, "ethernets": ethernets}))
        ))
    };
    let files = SeedFiles {
        meta_data: format!("{}\n", to_json(Value::Object(meta))),
        user_data,
        network_config,
    };
    let bytes = files.total_bytes();
    if bytes > MAX_SEED_BYTES {
        return Err(CloudInitError::TooLarge { bytes });
    }
    Ok(files)
}

fn to_json(v: Value) -> String {
    // Serializing a Value (string keys only) cannot fail.
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// netplan-style (version 2) settings of NIC `i`.
fn nic_config(i: usize, n: &NicNetwork, mac: &str) -> Result<Value, CloudInitError> {
    let field = |f: &str| format!("network[{i}].{f}");
    if n.addresses.len() > MAX_ADDRESSES {
        return Err(invalid(
            field("addresses"),
            format!("at most {MAX_ADDRESSES} are allowed"),
        ));
    }
    let mut addresses = Vec::new();
    for (j, a) in n.addresses.iter().enumerate() {
        let (ip, prefix) = parse_cidr(a).map_err(|r| {
            invalid(
                field(&format!("addresses[{j}]")),
                format!("{a:?} {r}; expected ADDRESS/PREFIX like 10.0.0.5/24 or 2001:db8::5/64"),
            )
        })?;
        addresses.push((ip, format!("{ip}/{prefix}")));
    }
    let mut eth = Map::new();
    eth.insert("match".into(), json!({"macaddress": mac}));
    if n.dhcp {
        eth.insert("dhcp4".into(), json!(true));
    }
    if !addresses.is_empty() {
        let list: Vec<&String> = addresses.iter().map(|(_, s)| s).collect();
        eth.insert("addresses".into(), json!(list));
    }
    if let Some(g) = &n.gateway {
        let gw: IpAddr = g
            .parse()
            .map_err(|_| invalid(field("gateway"), format!("{g:?} is not an IP address")))?;
        if gw.is_unspecified() || gw.is_multicast() {
            return Err(invalid(
                field("gateway"),
                format!("{g:?} cannot be a gateway"),
            ));
        }
        if !addresses.iter().any(|(ip, _)| ip.is_ipv4() == gw.is_ipv4()) {
            return Err(invalid(
                field("gateway"),
                format!(
                    "{g:?} needs a static address of the same IP version in addresses \
                     (with dhcp, DHCP supplies the gateway)"
                ),
            ));
        }
        // An explicit prefix instead of `to: default`, which older cloud-init releases do
        // not know.
        let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        eth.insert("routes".into(), json!([{"to": to, "via": gw.to_string()}]));
    }
    if n.nameservers.len() > MAX_NAMESERVERS {
        return Err(invalid(
            field("nameservers"),
            format!("at most {MAX_NAMESERVERS} are allowed"),
        ));
    }
    if !n.nameservers.is_empty() {
        let mut list = Vec::new();
        for (j, s) in n.nameservers.iter().enumerate() {
            let ip: IpAddr = s.parse().map_err(|_| {
                invalid(
                    field(&format!("nameservers[{j}]")),
                    format!("{s:?} is not an IP address"),
                )
            })?;
            list.push(ip.to_string());
        }
        eth.insert("nameservers".into(), json!({"addresses": list}));
    }
    Ok(Value::Object(eth))
}

/// `ADDRESS/PREFIX` with std's address parser; the prefix within the family's width.
fn parse_cidr(s: &str) -> Result<(IpAddr, u8), &'static str> {
    let (addr, prefix) = s.split_once('/').ok_or("has no /PREFIX")?;
    let ip: IpAddr = addr.parse().map_err(|_| "is not an IP address")?;
    if !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.is_empty() || prefix.len() > 3 {
        return Err("has an invalid prefix length");
    }
    let prefix: u8 = prefix.parse().map_err(|_| "has an invalid prefix length")?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err("has a prefix length beyond the address width");
    }
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err("cannot be an interface address");
    }
    Ok((ip, prefix))
}

/// RFC 1123 host name: dot-separated labels of letters, digits and '-' (not at either
/// end), 1 to 63 characters each, at most 253 in all.
fn validate_hostname(h: &str) -> Result<(), &'static str> {
    if h.is_empty() || h.len() > 253 {
        return Err("is not 1 to 253 characters long");
    }
    for label in h.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err("is not a valid host name");
        }
    }
    Ok(())
}

/// One line of an authorized_keys file: `TYPE BASE64 [COMMENT]`, printable, no newline (a
/// newline would smuggle in a second key or options).
fn validate_ssh_key(key: &str) -> Result<(), String> {
    if key.len() > 16 * 1024 {
        return Err("is longer than 16 KiB".to_owned());
    }
    if key.chars().any(|c| c.is_control()) {
        return Err("must be one line without control characters".to_owned());
    }
    let mut fields = key.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        return Err(format!(
            "{key:?} is not a public key like \"ssh-ed25519 AAAA... comment\""
        ));
    };
    let kind_ok = kind
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-@.".contains(&b));
    let blob_ok = blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !kind_ok || !blob_ok {
        return Err(format!(
            "{key:?} is not a public key like \"ssh-ed25519 AAAA... comment\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c";
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKr0 admin@ops";

    fn macs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("52:54:00:00:00:0{i}")).collect()
    }

    fn md(json: &str) -> Metadata {
        serde_json::from_str(json).unwrap()
    }

    /// A document as cloud-init loads it (JSON is the YAML subset used here).
    fn load(doc: &str) -> Value {
        serde_json::from_str(doc).unwrap()
    }

    #[test]
    fn defaults_to_the_vm_name_and_dhcp() {
        let seed = render(&Metadata::default(), "web-1", UUID, &macs(2)).unwrap();
        let meta = load(&seed.meta_data);
        assert_eq!(
            meta,
            json!({"instance-id": UUID, "local-hostname": "web-1"})
        );
        let (first, rest) = seed.user_data.split_once('\n').unwrap();
        assert_eq!(first, "#cloud-config");
        assert_eq!(load(rest), json!({"hostname": "web-1"}));
        let net = load(seed.network_config.as_deref().unwrap());
        assert_eq!(net["version"], 2);
        assert_eq!(
            net["ethernets"]["nic1"],
            json!({"match": {"macaddress": "52:54:00:00:00:01"}, "dhcp4": true})
        );
        let no_nics = render(&Metadata::default(), "web-1", UUID, &[]).unwrap();
        assert_eq!(no_nics.network_config, None);
        assert_eq!(
            no_nics.files().iter().map(|f| f.0).collect::<Vec<_>>(),
            ["meta-data", "user-data"]
        );
    }

    #[test]
    fn keys_and_user_data() {
        // Keys without user_data: in meta-data and in the generated cloud-config.
        let seed = render(
            &md(&format!(
                r#"{{"hostname":"db.example.org","ssh_authorized_keys":["{KEY}"]}}"#
            )),
            "db_1",
            UUID,
            &[],
        )
        .unwrap();
        assert_eq!(load(&seed.meta_data)["public-keys"], json!([KEY]));
        assert_eq!(load(&seed.meta_data)["local-hostname"], "db.example.org");
        let cc = load(seed.user_data.strip_prefix("#cloud-config\n").unwrap());
        assert_eq!(
            cc,
            json!({"hostname": "db.example.org", "ssh_authorized_keys": [KEY]})
        );
        // With user_data: verbatim, keys only in meta-data.
        let script = "#!/bin/sh\necho 'hi: \"there\"' > /tmp/x\n";
        let m = Metadata {
            user_data: Some(script.to_owned()),
            ssh_authorized_keys: vec![KEY.to_owned()],
            ..Metadata::default()
        };
        let seed = render(&m, "web", UUID, &[]).unwrap();
        assert_eq!(seed.user_data, script);
        assert_eq!(load(&seed.meta_data)["public-keys"], json!([KEY]));
    }

    #[test]
    fn hostile_strings_stay_inside_their_json_strings() {
        let m = Metadata {
            hostname: Some("web".into()),
            ssh_authorized_keys: vec![],
            user_data: None,
            network: vec![],
        };
        // A VM name can't break out (it is validated), and neither can a key comment.
        let seed = render(
            &Metadata {
                ssh_authorized_keys: vec![r#"ssh-rsa AAAA "x": y, #'"#.to_owned()],
                ..m
            },
            "web",
            UUID,
            &[],
        )
        .unwrap();
        assert_eq!(
            load(&seed.meta_data)["public-keys"][0],
            r#"ssh-rsa AAAA "x": y, #'"#
        );
    }

    #[test]
    fn static_network() {
        let m = md(r#"{"network":[
            {"addresses":["10.0.0.5/24","2001:DB8::5/64"],"gateway":"10.0.0.1",
             "nameservers":["10.0.0.1","2001:db8::53"]},
            {"dhcp":true}]}"#);
        let seed = render(&m, "web", UUID, &macs(3)).unwrap();
        let net = load(seed.network_config.as_deref().unwrap());
        assert_eq!(
            net,
            json!({"version": 2, "ethernets": {
                "nic0": {"match": {"macaddress": "52:54:00:00:00:00"},
                         "addresses": ["10.0.0.5/24", "2001:db8::5/64"],
                         "routes": [{"to": "0.0.0.0/0", "via": "10.0.0.1"}],
                         "nameservers": {"addresses": ["10.0.0.1", "2001:db8::53"]}},
                "nic1": {"match": {"macaddress": "52:54:00:00:00:01"}, "dhcp4": true},
                "nic2": {"match": {"macaddress": "52:54:00:00:00:02"}, "dhcp4": true}}})
        );
        // An IPv6 gateway gets an IPv6 default route.
        let m = md(r#"{"network":[{"addresses":["2001:db8::5/64"],"gateway":"2001:db8::1"}]}"#);
        let net = load(
            render(&m, "web", UUID, &macs(1))
                .unwrap()
                .network_config
                .as_deref()
                .unwrap(),
        );
        assert_eq!(
            net["ethernets"]["nic0"]["routes"],
            json!([{"to": "::/0", "via": "2001:db8::1"}])
        );
    }

    #[test]
    fn refuses_bad_metadata() {
        let err = |json: &str, nics: usize| {
            render(&md(json), "web", UUID, &macs(nics))
                .unwrap_err()
                .to_string()
        };
        let cases: &[(&str, usize, &str)] = &[
            (r#"{"hostname":"-web"}"#, 0, "metadata.hostname"),
            (r#"{"hostname":"web_1"}"#, 0, "metadata.hostname"),
            (r#"{"hostname":"a..b"}"#, 0, "metadata.hostname"),
            (
                r#"{"ssh_authorized_keys":["ssh-ed25519 AAAA\nssh-rsa BBBB"]}"#,
                0,
                "ssh_authorized_keys[0]",
            ),
            (
                r#"{"ssh_authorized_keys":["hello"]}"#,
                0,
                "ssh_authorized_keys[0]",
            ),
            (
                r#"{"network":[{"dhcp":true}]}"#,
                0,
                "has 1 entries but the VM has 0 nics",
            ),
            (
                r#"{"network":[{"addresses":["10.0.0.5"]}]}"#,
                1,
                "has no /PREFIX",
            ),
            (
                r#"{"network":[{"addresses":["10.0.0.5/33"]}]}"#,
                1,
                "prefix length",
            ),
            (
                r#"{"network":[{"addresses":["10.0.0.5/2 4"]}]}"#,
                1,
                "prefix length",
            ),
            (
                r#"{"network":[{"addresses":["10.0.0.256/24"]}]}"#,
                1,
                "not an IP address",
            ),
            (
                r#"{"network":[{"addresses":["0.0.0.0/0"]}]}"#,
                1,
                "interface address",
            ),
            (
                r#"{"network":[{"addresses":["10.0.0.5/24"],"gateway":"10.0.0"}]}"#,
                1,
                "network[0].gateway",
            ),
            (
                r#"{"network":[{"dhcp":true,"gateway":"10.0.0.1"}]}"#,
                1,
                "needs a static address",
            ),
            (
                r#"{"network":[{"addresses":["2001:db8::5/64"],"gateway":"10.0.0.1"}]}"#,
                1,
                "same IP version",
            ),
            (
                r#"{"network":[{"dhcp":true,"nameservers":["dns.example"]}]}"#,
                1,
                "network[0].nameservers[0]",
            ),
        ];
        for (json, nics, want) in cases {
            let e = err(json, *nics);
            assert!(e.contains(want), "{json}: {e}");
        }
        // Unknown fields are typos, not ignored.
        assert!(serde_json::from_str::<Metadata>(r#"{"hostnme":"x"}"#).is_err());
        assert!(serde_json::from_str::<Metadata>(r#"{"network":[{"dhcp4":true}]}"#).is_err());
        // The default hostname must be valid too.
        let e = render(&Metadata::default(), "web_1", UUID, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostname: is required"), "{e}");
    }

    #[test]
    fn seed_size_is_limited() {
        let big = |n: usize| Metadata {
            user_data: Some("x".repeat(n)),
            ..Metadata::default()
        };
        let fixed = render(&big(0), "web", UUID, &macs(1))
            .unwrap()
            .total_bytes();
        let fits = render(&big(MAX_SEED_BYTES - fixed), "web", UUID, &macs(1)).unwrap();
        assert_eq!(fits.total_bytes(), MAX_SEED_BYTES);
        let e = render(&big(MAX_SEED_BYTES - fixed + 1), "web", UUID, &macs(1)).unwrap_err();
        assert_eq!(
            e,
            CloudInitError::TooLarge {
                bytes: MAX_SEED_BYTES + 1
            }
        );
        assert!(e.to_string().contains("at most 65536"), "{e}");
    }
}
