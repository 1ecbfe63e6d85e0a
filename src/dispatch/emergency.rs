//! 911 redirect policy: which methods to try, in what order.
//!
//! Set in the `--config` YAML as `emergency: {method: refer|bridge|announce, uri: "sip:..."}`.
//! The configured method falls back along refer → bridge → announce; with no `uri` the only
//! method is `announce` (the spoken instruction to hang up and dial 911). Why all three: a
//! carrier trunk often cannot act on a REFER; a bridged leg shows the 911 centre the city's
//! trunk unless the caller's number travels in From and P-Asserted-Identity; so the method is
//! the city's choice, and the plain instruction is always the last resort.
//!
//! The bridge puts the caller's number in From and P-Asserted-Identity only when a trusted
//! trunk asserted it (`trunks.allow`, see [`crate::call::CallerIdentity`]): a number a caller
//! typed into From would otherwise send responders to whoever it belongs to. An unverified
//! caller is connected all the same, presented as the city's line; the audit records the
//! number they claimed and that it was not verified.
//!
//! This module decides; the call's redirect machine (`call::emergency`) carries it out (REFER
//! through the caller's dialog, an outbound INVITE for bridging) and writes the audit row
//! through the ticket store before anything starts.

use serde::Deserialize;

/// How a caller is sent to 911.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmergencyMethod {
    /// REFER the caller's phone to the emergency URI (RFC 3515) and follow the NOTIFYs.
    Refer,
    /// Call the emergency URI ourselves and bridge the caller to it.
    Bridge,
    /// Tell the caller to hang up and dial 911, repeated, then hang up so the line is free.
    Announce,
}

impl EmergencyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            EmergencyMethod::Refer => "refer",
            EmergencyMethod::Bridge => "bridge",
            EmergencyMethod::Announce => "announce",
        }
    }
}

/// The `emergency:` section of the config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmergencyConfig {
    /// Default: `refer` when a `uri` is set, else `announce`.
    pub method: Option<EmergencyMethod>,
    /// Where 911 is reached, e.g. `sip:911@psap.example.gov`.
    pub uri: Option<String>,
    /// Further routes to 911 that the bridge tries, in order, when the one before fails (no
    /// answer within a few seconds, refused, a name that does not resolve): a second carrier,
    /// the PSAP's alternate route. `sip:` URIs. Default none: after `uri`, the announcement.
    pub backup_uris: Vec<String>,
    /// How many times `announce` speaks the instruction. Default 2.
    pub announce_repeats: u32,
    /// How long to wait for a REFER's final NOTIFY or a bridged leg's answer. Default 30.
    pub(crate) timeout_seconds: u64,
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        EmergencyConfig {
            method: None,
            uri: None,
            backup_uris: Vec::new(),
            announce_repeats: 2,
            timeout_seconds: 30,
        }
    }
}

impl EmergencyConfig {
    /// The methods to try, in order; always ends with `Announce`. `Bridge` comes once for
    /// each of [`EmergencyConfig::bridge_targets`].
    pub(crate) fn plan(&self) -> Vec<EmergencyMethod> {
        use EmergencyMethod::*;
        if self.uri.is_none() {
            return vec![Announce];
        }
        let bridges = std::iter::repeat_n(Bridge, self.bridge_targets().len());
        let first = match self.method.unwrap_or(Refer) {
            Refer => vec![Refer],
            Bridge => vec![],
            Announce => return vec![Announce],
        };
        first.into_iter().chain(bridges).chain([Announce]).collect()
    }

    /// Where the bridge calls, in order: `uri`, then `backup_uris`.
    pub(crate) fn bridge_targets(&self) -> Vec<String> {
        self.uri.iter().chain(&self.backup_uris).cloned().collect()
    }

    /// Problems with the section, for start-up.
    pub fn check(&self) -> Result<(), String> {
        if let Some(u) = &self.uri {
            let scheme = u.split(':').next().unwrap_or("");
            if !matches!(scheme, "sip" | "sips" | "tel") || !u.contains(':') {
                return Err(format!(
                    "emergency.uri {u:?} must be a sip:, sips: or tel: URI"
                ));
            }
        }
        for u in &self.backup_uris {
            if !u.starts_with("sip:") || u.len() <= 4 {
                return Err(format!(
                    "emergency.backup_uris: {u:?} must be a sip: URI (the bridge calls it)"
                ));
            }
        }
        if !self.backup_uris.is_empty() && self.uri.is_none() {
            return Err("emergency.backup_uris needs emergency.uri (the first route)".into());
        }
        if matches!(
            self.method,
            Some(EmergencyMethod::Refer | EmergencyMethod::Bridge)
        ) && self.uri.is_none()
        {
            return Err("emergency.method refer/bridge needs emergency.uri".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::EmergencyMethod::*;
    use super::*;

    #[test]
    fn fallback_order() {
        let mut c = EmergencyConfig::default();
        assert_eq!(c.plan(), vec![Announce]);
        c.uri = Some("sip:911@psap".into());
        assert_eq!(c.plan(), vec![Refer, Bridge, Announce]);
        c.method = Some(Bridge);
        assert_eq!(c.plan(), vec![Bridge, Announce]);
        c.method = Some(Announce);
        assert_eq!(c.plan(), vec![Announce]);
        // Each backup route is one more bridge attempt before the announcement.
        c.backup_uris = vec!["sip:911@alt-a".into(), "sip:911@alt-b".into()];
        c.method = None;
        assert_eq!(c.plan(), vec![Refer, Bridge, Bridge, Bridge, Announce]);
        c.method = Some(Bridge);
        assert_eq!(c.plan(), vec![Bridge, Bridge, Bridge, Announce]);
        assert_eq!(
            c.bridge_targets(),
            vec!["sip:911@psap", "sip:911@alt-a", "sip:911@alt-b"]
        );
    }

    #[test]
    fn check_rejects_bad_uris_and_missing_uri() {
        let c = EmergencyConfig {
            uri: Some("http://x".into()),
            ..Default::default()
        };
        assert!(c.check().is_err());
        let c = EmergencyConfig {
            method: Some(Refer),
            ..Default::default()
        };
        assert!(c.check().is_err());
        assert!(EmergencyConfig::default().check().is_ok());
        let c = EmergencyConfig {
            uri: Some("sip:911@psap".into()),
            backup_uris: vec!["tel:911".into()],
            ..Default::default()
        };
        assert!(c.check().is_err());
        let c = EmergencyConfig {
            backup_uris: vec!["sip:911@alt".into()],
            ..Default::default()
        };
        assert!(c.check().is_err());
    }
}
