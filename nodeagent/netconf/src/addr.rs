//! Small value types used in documents: IP prefixes (`10.0.0.5/24`) and MAC addresses.
//!
//! They (de)serialize as strings so documents stay readable and diffs stay small.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an address string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrParseError {
    #[error("{0:?} is not a CIDR: expected ADDRESS/PREFIX, e.g. 10.0.0.5/24 or fd00::5/64")]
    MissingPrefix(String),
    #[error("{0:?} is not a CIDR: {1:?} is not an IPv4 or IPv6 address")]
    BadAddress(String, String),
    #[error("{0:?} is not a CIDR: prefix length {1:?} is not a number in 0..={2}")]
    BadPrefix(String, String, u8),
    #[error("{0:?} is not a MAC address: expected six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
}

/// An IP address with a prefix length, e.g. `10.100.0.5/24` (an interface address) or
/// `0.0.0.0/0` (a route destination).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct IpCidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpCidr {
    /// Builds a prefix, rejecting a length that does not fit the family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<IpCidr> {
        (prefix_len <= max_prefix_len(&addr)).then_some(IpCidr { addr, prefix_len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The same prefix with all host bits cleared (`10.0.0.5/24` -> `10.0.0.0/24`).
    pub fn network(&self) -> IpCidr {
        let addr = match self.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        IpCidr {
            addr,
            prefix_len: self.prefix_len,
        }
    }

    /// Whether `ip` lies inside this prefix (same family required).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let other = IpCidr {
            addr: *ip,
            prefix_len: self.prefix_len,
        };
        other.network() == self.network()
    }
}

fn max_prefix_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

impl FromStr for IpCidr {
    type Err = AddrParseError;

    fn from_str(text: &str) -> Result<IpCidr, AddrParseError> {
        let (addr_text, prefix_text) = text
            .split_once('/')
            .ok_or_else(|| AddrParseError::MissingPrefix(text.to_string()))?;
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| AddrParseError::BadAddress(text.to_string(), addr_text.to_string()))?;
        let max = max_prefix_len(&addr);
        let prefix_len: u8 = prefix_text
            .parse()
            .ok()
            .filter(|len| *len <= max)
            .ok_or_else(|| {
                AddrParseError::BadPrefix(text.to_string(), prefix_text.to_string(), max)
            })?;
        Ok(IpCidr { addr, prefix_len })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpCidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpCidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<IpCidr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Reads a kernel hardware address attribute; anything but 6 bytes is not Ethernet.
    pub fn from_bytes(bytes: &[u8]) -> Option<MacAddr> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = AddrParseError;

    fn from_str(text: &str) -> Result<MacAddr, AddrParseError> {
        let bad = || AddrParseError::BadMac(text.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<MacAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_normalizes() {
        let cidr: IpCidr = "10.100.0.5/24".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.100.0.5/24");
        assert_eq!(cidr.network().to_string(), "10.100.0.0/24");
        assert!(cidr.contains(&"10.100.0.1".parse().unwrap()));
        assert!(!cidr.contains(&"10.100.1.1".parse().unwrap()));
        assert!(!cidr.contains(&"fd00::1".parse().unwrap()));
        let v6: IpCidr = "fd00:100::5/64".parse().unwrap();
        assert_eq!(v6.network().to_string(), "fd00:100::/64");
        let default: IpCidr = "0.0.0.0/0".parse().unwrap();
        assert!(default.contains(&"8.8.8.8".parse().unwrap()));
        let host: IpCidr = "10.0.0.1/32".parse().unwrap();
        assert_eq!(host.network(), host);
    }

    #[test]
    fn cidr_rejects_garbage() {
        assert!(matches!(
            "10.0.0.5".parse::<IpCidr>(),
            Err(AddrParseError::MissingPrefix(_))
        ));
        assert!(matches!(
            "10.0.0.300/24".parse::<IpCidr>(),
            Err(AddrParseError::BadAddress(..))
        ));
        assert!(matches!(
            "10.0.0.3/33".parse::<IpCidr>(),
            Err(AddrParseError::BadPrefix(..))
        ));
        assert!(matches!(
            "fd00::1/129".parse::<IpCidr>(),
            Err(AddrParseError::BadPrefix(..))
        ));
    }

    #[test]
    fn mac_round_trips() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0f:11".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<MacAddr>().is_err());
    }
}
