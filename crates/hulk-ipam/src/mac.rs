//! A 48-bit Ethernet address.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address, written `fa:16:3e:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not six `:`-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex octets like fa:16:3e:00:00:01)")]
pub struct ParseMacError(String);

impl MacAddr {
    /// The octets.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

/// Bytes that are not six: what netlink's address attribute holds for a
/// link that is not Ethernet-like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} bytes are not a MAC address (six are)")]
pub struct MacLengthError(usize);

impl TryFrom<&[u8]> for MacAddr {
    type Error = MacLengthError;

    /// The six bytes of a netlink `IFLA_ADDRESS`.
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(bytes)
            .map(MacAddr)
            .map_err(|_| MacLengthError(bytes.len()))
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseMacError(text.to_owned());
        let mut octets = [0u8; 6];
        let mut parts = text.split([':', '-']);
        for octet in &mut octets {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 || !part.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return Err(error());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddr(octets))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    /// The written form (`"fa:16:3e:00:00:01"`), or six numbers: how the
    /// datapath's records and the plugin API wrote a MAC before this type
    /// was the only one, so records of an older agent stay readable.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Octets([u8; 6]),
        }
        match Written::deserialize(deserializer)? {
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Written::Octets(octets) => Ok(MacAddr(octets)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_written_form_and_an_older_records_octets() {
        let written: MacAddr = serde_json::from_str("\"fa:16:3e:00:0a:ff\"").unwrap();
        let octets: MacAddr = serde_json::from_str("[250, 22, 62, 0, 10, 255]").unwrap();
        assert_eq!(written, octets);
        assert_eq!(
            serde_json::to_string(&octets).unwrap(),
            "\"fa:16:3e:00:0a:ff\""
        );
        assert!(serde_json::from_str::<MacAddr>("[250, 22, 62]").is_err());
    }

    #[test]
    fn parses_colon_and_dash_forms() {
        let mac: MacAddr = "FA-16-3e-00-0a-ff".parse().unwrap();
        assert_eq!(mac.to_string(), "fa:16:3e:00:0a:ff");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for text in [
            "",
            "fa:16:3e:00:00",
            "fa:16:3e:00:00:01:02",
            "fa:16:3e:00:00:1",
            "zz:16:3e:00:00:01",
            "+a:16:3e:00:00:01",
        ] {
            assert!(text.parse::<MacAddr>().is_err(), "{text}");
        }
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(octets in any::<[u8; 6]>()) {
            let mac = MacAddr(octets);
            prop_assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
            let json = serde_json::to_string(&mac).unwrap();
            prop_assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        }

        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,24}") {
            let _ = text.parse::<MacAddr>();
        }
    }
}
