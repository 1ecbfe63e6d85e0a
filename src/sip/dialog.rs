//! SIP dialogs (RFC 3261 §12) as seen by a UAS: identifiers, route set, remote target and CSeq.
//!
//! A [`Dialog`] is created by the UA core when an INVITE arrives and is filled in by the
//! responses it sends. It builds the in-dialog requests we originate (BYE, REFER, INFO) and
//! checks the CSeq of the ones we receive. No I/O, no timers.

use crate::sip::message::{self, Method, Request, RequestBuilder};
use crate::sip::transport::Flow;
use bytes::Bytes;
use std::net::SocketAddr;

/// Dialog state from the UAS side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialogState {
    /// INVITE received, no final response yet.
    Early,
    /// 2xx sent; `acked` once the ACK arrived.
    Confirmed { acked: bool },
    /// BYE sent or received; waiting for the last transaction.
    Terminating,
}

/// Why an in-dialog request was refused on CSeq grounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CSeqError {
    /// Lower than the last one seen (RFC 3261 §12.2.2: answer 500).
    #[error("CSeq {got} is lower than {last}")]
    OutOfOrder { got: u32, last: u32 },
}

/// One dialog.
#[derive(Debug, Clone)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// The URI we are (the INVITE's To URI), e.g. `sip:311@city`.
    pub local_uri: String,
    /// The INVITE's From header as it arrived (carries the remote tag); our To in requests.
    pub remote_from: String,
    /// Where requests go per RFC 3261 (the remote Contact).
    pub remote_target: String,
    /// Record-Route set, in the order a UAS uses it (as received).
    pub route_set: Vec<String>,
    pub local_cseq: u32,
    pub remote_cseq: u32,
    /// The flow the dialog arrived on; we send our requests back along it (see `ua` docs).
    pub flow: Flow,
    pub state: DialogState,
}

impl Dialog {
    /// The dialog an INVITE creates on our side.
    pub fn from_invite(req: &Request, local_tag: String, flow: Flow) -> Dialog {
        let remote_target = req
            .contacts()
            .first()
            .map(|c| c.uri.clone())
            .unwrap_or_else(|| req.from.uri.clone());
        Dialog {
            call_id: req.call_id.clone(),
            local_tag,
            remote_tag: req.from.tag().unwrap_or_default().to_owned(),
            local_uri: req.to.uri.clone(),
            remote_from: req.from.raw.clone(),
            remote_target,
            route_set: req.record_routes(),
            local_cseq: rand::random::<u16>() as u32 + 1,
            remote_cseq: req.cseq,
            flow,
            state: DialogState::Early,
        }
    }

    /// Check and record the CSeq of a new in-dialog request (not ACK/CANCEL).
    pub fn check_remote_cseq(&mut self, cseq: u32) -> Result<(), CSeqError> {
        if cseq < self.remote_cseq {
            return Err(CSeqError::OutOfOrder {
                got: cseq,
                last: self.remote_cseq,
            });
        }
        self.remote_cseq = cseq;
        Ok(())
    }

    /// A target refresh (re-INVITE/UPDATE with Contact) changes the remote target.
    pub fn refresh_target(&mut self, req: &Request) {
        if let Some(c) = req.contacts().first() {
            self.remote_target = c.uri.clone();
        }
    }

    /// Build an in-dialog request; returns (bytes, branch).
    pub fn request(
        &mut self,
        method: &Method,
        local: SocketAddr,
        extra: &[(String, String)],
        body: Option<(&str, Bytes)>,
    ) -> (Bytes, String) {
        self.local_cseq += 1;
        let branch = message::new_branch();
        let mut b = RequestBuilder::new(
            method,
            &self.remote_target,
            self.flow.transport.via_name(),
            local,
            &branch,
        );
        for r in &self.route_set {
            b = b.header("Route", r);
        }
        b = b
            .header(
                "From",
                format_args!("<{}>;tag={}", self.local_uri, self.local_tag),
            )
            .header("To", &self.remote_from)
            .header("Call-ID", &self.call_id)
            .header("CSeq", format_args!("{} {}", self.local_cseq, method))
            .header(
                "Contact",
                format_args!("<{}>", contact_uri(local, self.flow)),
            );
        for (k, v) in extra {
            b = b.header(k, v);
        }
        if let Some((ct, body)) = body {
            b = b.body(ct, body);
        }
        (b.build(), branch)
    }
}

/// Our Contact URI for a flow.
pub fn contact_uri(local: SocketAddr, flow: Flow) -> String {
    match flow.transport {
        crate::sip::transport::Transport::Udp => format!("sip:ivr311@{local}"),
        crate::sip::transport::Transport::Tcp => format!("sip:ivr311@{local};transport=tcp"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse_datagram, Message};
    use crate::sip::transport::Transport;

    const INVITE: &str = "INVITE sip:311@127.0.0.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n\
Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n\
From: <sip:alice@127.0.0.1:5070>;tag=abc\r\n\
To: <sip:311@127.0.0.1>\r\n\
Call-ID: c1\r\n\
CSeq: 5 INVITE\r\n\
Contact: <sip:alice@10.0.0.5:5070>\r\n\
Content-Length: 0\r\n\r\n";

    fn dialog() -> Dialog {
        let Ok(Message::Request(r)) = parse_datagram(INVITE.as_bytes(), 65536) else {
            panic!()
        };
        let flow = Flow {
            transport: Transport::Udp,
            remote: "127.0.0.1:5070".parse().unwrap(),
            conn: 0,
        };
        Dialog::from_invite(&r, "loc".into(), flow)
    }

    #[test]
    fn bye_carries_dialog_identifiers_and_route_set() {
        let mut d = dialog();
        assert_eq!(d.remote_tag, "abc");
        assert_eq!(d.remote_target, "sip:alice@10.0.0.5:5070");
        let (bytes, branch) = d.request(&Method::Bye, "127.0.0.1:5060".parse().unwrap(), &[], None);
        let Ok(Message::Request(bye)) = parse_datagram(&bytes, 65536) else {
            panic!("BYE must parse")
        };
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.uri, "sip:alice@10.0.0.5:5070");
        assert_eq!(bye.from.tag(), Some("loc"));
        assert_eq!(bye.to.tag(), Some("abc"));
        assert_eq!(bye.call_id, "c1");
        assert_eq!(bye.top_via().branch.as_deref(), Some(branch.as_str()));
        let routes: Vec<&str> = bye.headers_named("Route").collect();
        assert_eq!(routes, vec!["<sip:p1.example;lr>", "<sip:p2.example;lr>"]);
        let first = bye.cseq;
        let (bytes, _) = d.request(&Method::Bye, "127.0.0.1:5060".parse().unwrap(), &[], None);
        let Ok(Message::Request(again)) = parse_datagram(&bytes, 65536) else {
            panic!()
        };
        assert_eq!(again.cseq, first + 1);
    }

    #[test]
    fn cseq_must_not_go_backwards() {
        let mut d = dialog();
        assert!(d.check_remote_cseq(6).is_ok());
        assert_eq!(
            d.check_remote_cseq(4),
            Err(CSeqError::OutOfOrder { got: 4, last: 6 })
        );
    }
}
