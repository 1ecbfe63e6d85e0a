//! Integer socket options that std and tokio do not expose (`IP_TOS`, `IPV6_TCLASS`,
//! `SO_RCVBUF` as granted): one place for the `unsafe` `setsockopt`/`getsockopt` calls, used by
//! the QoS marking ([`crate::config::set_dscp`]) and the SIP socket's receive buffer.

use std::io;
use std::os::fd::RawFd;

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
pub fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
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
    use std::os::fd::AsRawFd;

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
}
