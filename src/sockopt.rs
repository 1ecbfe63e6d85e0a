//! Socket options that std and tokio do not expose: the QoS marking of our packets (the
//! `qos:` section, [`QosConfig`], `set_dscp`) and integer options such as `SO_RCVBUF` as
//! granted. One place for the `unsafe` `setsockopt`/`getsockopt` calls, used by the SIP
//! transport and the RTP port pool.
//!
//! Owns nothing but these calls and the DSCP types; imports nothing from the rest of the crate.

use serde::Deserialize;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// A DSCP code point (RFC 2474): 0 to 63. Read from YAML as a number; anything larger is refused
/// with the line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dscp(pub u8);

impl Dscp {
    /// Expedited Forwarding (RFC 3246), RFC 4594's class for telephony: our RTP by default.
    pub(crate) const EF: Dscp = Dscp(46);
    /// CS3: the call-signalling class of Cisco's QoS baseline and Asterisk's sample
    /// configuration; our SIP by default.
    pub(crate) const CS3: Dscp = Dscp(24);
}

impl<'de> Deserialize<'de> for Dscp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u8::deserialize(d)?;
        if v > 63 {
            return Err(serde::de::Error::custom(format!(
                "DSCP {v} is out of range: a code point is 0 to 63 (46 = EF, 24 = CS3, 0 = unmarked)"
            )));
        }
        Ok(Dscp(v))
    }
}

/// How our packets are marked for the network's quality of service (the `qos:` section).
///
/// A city's network (or its carrier's) queues voice ahead of bulk traffic only if the packets
/// say they are voice. Phones mark their own RTP EF; a server that leaves its RTP unmarked
/// gets one-way quality problems under load that no phone-side setting fixes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QosConfig {
    /// RTP (every call's and every bridged leg's audio). Default 46: Expedited Forwarding
    /// (RFC 3246), RFC 4594's class for telephony.
    pub rtp_dscp: Dscp,
    /// SIP (UDP, and TCP connections callers open). Default 24: CS3, the call-signalling
    /// class of Cisco's QoS baseline and Asterisk's sample configuration (RFC 4594 suggests
    /// CS5 = 40; set that if your network follows it).
    pub sip_dscp: Dscp,
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig {
            rtp_dscp: Dscp::EF,
            sip_dscp: Dscp::CS3,
        }
    }
}

/// Mark a socket's packets with `dscp` (IPv4 `IP_TOS` or IPv6 `IPV6_TCLASS`; the two ECN bits
/// are left clear). A failure only costs the marking, so callers log it and go on.
/// An IPv6 socket also gets `IP_TOS`, for the IPv4 peers it reaches as mapped addresses.
pub(crate) fn set_dscp(socket: &impl AsRawFd, ipv6: bool, dscp: Dscp) -> io::Result<()> {
    let tos = libc::c_int::from(dscp.0) << 2;
    let fd = socket.as_raw_fd();
    if ipv6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos)?;
        let _ = set_int(fd, libc::IPPROTO_IP, libc::IP_TOS, tos);
        Ok(())
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_TOS, tos)
    }
}

/// The DSCP an IPv4 socket marks its packets with (tests).
#[cfg(test)]
pub(crate) fn dscp_of(socket: &impl AsRawFd) -> u8 {
    let tos = get_int(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TOS).unwrap();
    (tos >> 2) as u8
}

/// Set an `int` option on `fd`.
pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points to a c_int of the size given; a bad fd is an error return.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Read an `int` option of `fd`.
pub(crate) fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` outlive the call and describe a c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_option_set_reads_back_and_a_bad_fd_is_an_error() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TOS, 46 << 2).unwrap();
        assert_eq!(
            get_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TOS).unwrap(),
            46 << 2
        );
        assert!(set_int(-1, libc::IPPROTO_IP, libc::IP_TOS, 0).is_err());
        assert!(get_int(-1, libc::IPPROTO_IP, libc::IP_TOS).is_err());
    }

    #[test]
    fn a_marked_socket_carries_its_code_point() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_dscp(&s, false, Dscp::EF).unwrap();
        assert_eq!(dscp_of(&s), 46);
    }
}
