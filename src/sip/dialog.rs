//! SIP dialogs (RFC 3261 §12): identifiers, route set, remote target and CSeq.
//!
//! A [`Dialog`] is created by the UA core either when an INVITE arrives (UAS side,
//! `Dialog::from_invite`, filled in by the responses it sends) or when a 2xx answers an INVITE
//! we sent (UAC side, `Dialog::from_uac`). It builds the in-dialog requests we originate (BYE,
//! REFER, INFO, and the ACK for a 2xx) and checks the CSeq of the ones we receive. No I/O, no
//! timers.
//!
//! The field names follow the UAS side, where the dialog began: `local_uri` is the URI we are
//! (our From in requests we send), `remote_from` the remote party's name-addr with its tag (our
//! To in requests we send). For a UAC dialog those are our INVITE's From URI and the 2xx's To.

use crate::sip::message::{self, Common, Method, Request, RequestBuilder, Response};
use crate::sip::transport::Flow;
use bytes::Bytes;
use std::net::SocketAddr;

/// Dialog state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialogState {
    /// UAS: INVITE received, no final response yet.
    Early,
    /// UAS: 2xx sent; `acked` once the ACK arrived. UAC: 2xx received and ACKed (`acked: true`).
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
    /// The URI we are: the INVITE's To URI (UAS), e.g. `sip:311@city`, or our own From URI (UAC).
    pub local_uri: String,
    /// The remote party's name-addr with its tag, used as To in our requests: the INVITE's From
    /// as it arrived (UAS), or the 2xx's To as it arrived (UAC).
    pub remote_from: String,
    /// Where requests go per RFC 3261 (the remote Contact).
    pub remote_target: String,
    /// The route set, in the order our requests carry it as Route headers: Record-Route as
    /// received (UAS), or reversed (UAC, RFC 3261 §12.1.2).
    pub route_set: Vec<String>,
    pub local_cseq: u32,
    pub remote_cseq: u32,
    /// The flow the dialog arrived on; we send our requests back along it (see `ua` docs).
    pub flow: Flow,
    pub state: DialogState,
}

impl Dialog {
    /// The dialog an INVITE creates on our side.
    pub(crate) fn from_invite(req: &Request, local_tag: String, flow: Flow) -> Dialog {
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

    /// The dialog a 2xx to an INVITE we sent creates (UAC side, RFC 3261 §12.1.2).
    ///
    /// `local_uri` and `local_tag` are our INVITE's From URI and tag; `request_uri` the INVITE's
    /// Request-URI (the remote target if the 2xx carries no Contact); `invite_cseq` its CSeq
    /// number, which the ACK reuses and our next request increments. The remote CSeq starts
    /// empty (0): whatever the peer sends first is accepted.
    pub(crate) fn from_uac(
        resp: &Response,
        local_uri: String,
        local_tag: String,
        request_uri: &str,
        invite_cseq: u32,
        flow: Flow,
    ) -> Dialog {
        let remote_target = resp
            .contacts()
            .first()
            .map(|c| c.uri.clone())
            .unwrap_or_else(|| request_uri.to_owned());
        let mut route_set = resp.record_routes();
        route_set.reverse();
        Dialog {
            call_id: resp.call_id.clone(),
            local_tag,
            remote_tag: resp.to.tag().unwrap_or_default().to_owned(),
            local_uri,
            remote_from: resp.to.raw.clone(),
            remote_target,
            route_set,
            local_cseq: invite_cseq,
            remote_cseq: 0,
            flow,
            state: DialogState::Confirmed { acked: true },
        }
    }

    /// Check and record the CSeq of a new in-dialog request (not ACK/CANCEL).
    pub(crate) fn check_remote_cseq(&mut self, cseq: u32) -> Result<(), CSeqError> {
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
    /// So does the 2xx to a re-INVITE we sent (RFC 3261 §12.2.1.2).
    pub(crate) fn refresh_target(&mut self, msg: &Common) {
        if let Some(c) = msg.contacts().first() {
            self.remote_target = c.uri.clone();
        }
    }

    /// Build an in-dialog request; returns (bytes, branch).
    pub(crate) fn request(
        &mut self,
        method: &Method,
        local: SocketAddr,
        extra: &[(String, String)],
        body: Option<(&str, Bytes)>,
    ) -> (Bytes, String) {
        self.local_cseq += 1;
        let branch = message::new_branch();
        let b = self.start(method, self.local_cseq, local, &branch).header(
            "Contact",
            format_args!("<{}>", contact_uri(local, self.flow)),
        );
        (Self::finish(b, extra, body), branch)
    }

    /// The ACK for a 2xx to the INVITE with CSeq `invite_cseq` (RFC 3261 §13.2.2.4): a new
    /// transaction (fresh branch), the INVITE's CSeq number, sent along the route set. Does not
    /// touch the local CSeq.
    pub(crate) fn ack(
        &self,
        invite_cseq: u32,
        local: SocketAddr,
        extra: &[(String, String)],
    ) -> Bytes {
        let branch = message::new_branch();
        let b = self.start(&Method::Ack, invite_cseq, local, &branch);
        Self::finish(b, extra, None)
    }

    /// Start line, Via, Route set and the dialog identifiers.
    fn start(&self, method: &Method, cseq: u32, local: SocketAddr, branch: &str) -> RequestBuilder {
        let mut b = RequestBuilder::new(
            method,
            &self.remote_target,
            self.flow.transport.via_name(),
            local,
            branch,
        );
        for r in &self.route_set {
            b = b.header("Route", r);
        }
        b.header(
            "From",
            format_args!("<{}>;tag={}", self.local_uri, self.local_tag),
        )
        .header("To", &self.remote_from)
        .header("Call-ID", &self.call_id)
        .header("CSeq", format_args!("{cseq} {method}"))
    }

    fn finish(
        mut b: RequestBuilder,
        extra: &[(String, String)],
        body: Option<(&str, Bytes)>,
    ) -> Bytes {
        for (k, v) in extra {
            b = b.header(k, v);
        }
        if let Some((ct, body)) = body {
            b = b.body(ct, body);
        }
        b.build()
    }
}

/// Our Contact URI for a flow.
pub(crate) fn contact_uri(local: SocketAddr, flow: Flow) -> String {
    match flow.transport {
        crate::sip::transport::Transport::Udp => format!("sip:ivr311@{local}"),
        crate::sip::transport::Transport::Tcp => format!("sip:ivr311@{local};transport=tcp"),
        // RFC 7118 §5.2: a browser sends to us along its connection whatever our URI says.
        crate::sip::transport::Transport::Ws | crate::sip::transport::Transport::Wss => {
            format!("sip:ivr311@{local};transport=ws")
        }
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

    const OK_2XX: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-inv;rport\r\n\
Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n\
Record-Route: <sip:p3.example;lr>\r\n\
From: \"Caller\" <sip:+15551234567@127.0.0.1:5060>;tag=ours\r\n\
To: <sip:911@127.0.0.1:5080>;tag=theirs\r\n\
Call-ID: uac1\r\n\
CSeq: 7 INVITE\r\n\
Contact: <sip:psap@10.0.0.9:5080>\r\n\
Content-Length: 0\r\n\r\n";

    fn uac_dialog(text: &str) -> Dialog {
        let Ok(Message::Response(r)) = parse_datagram(text.as_bytes(), 65536) else {
            panic!("2xx must parse")
        };
        let flow = Flow {
            transport: Transport::Udp,
            remote: "127.0.0.1:5080".parse().unwrap(),
            conn: 0,
        };
        Dialog::from_uac(
            &r,
            "sip:+15551234567@127.0.0.1:5060".into(),
            "ours".into(),
            "sip:911@127.0.0.1:5080",
            7,
            flow,
        )
    }

    fn parse_req(bytes: &[u8]) -> Request {
        let Ok(Message::Request(r)) = parse_datagram(bytes, 65536) else {
            panic!("request must parse")
        };
        r
    }

    #[test]
    fn uac_dialog_from_2xx() {
        let d = uac_dialog(OK_2XX);
        assert_eq!(d.call_id, "uac1");
        assert_eq!(d.local_tag, "ours");
        assert_eq!(d.remote_tag, "theirs");
        assert_eq!(d.remote_target, "sip:psap@10.0.0.9:5080");
        assert_eq!(d.remote_from, "<sip:911@127.0.0.1:5080>;tag=theirs");
        // UAC rule: the Record-Route set reversed.
        assert_eq!(
            d.route_set,
            vec![
                "<sip:p3.example;lr>",
                "<sip:p2.example;lr>",
                "<sip:p1.example;lr>"
            ]
        );
        assert_eq!(d.local_cseq, 7);
        assert_eq!(d.remote_cseq, 0);
        assert_eq!(d.state, DialogState::Confirmed { acked: true });
    }

    #[test]
    fn uac_dialog_without_contact_targets_the_request_uri() {
        let text = OK_2XX.replace("Contact: <sip:psap@10.0.0.9:5080>\r\n", "");
        let d = uac_dialog(&text);
        assert_eq!(d.remote_target, "sip:911@127.0.0.1:5080");
    }

    #[test]
    fn uac_ack_and_bye_carry_our_tag_in_from_and_theirs_in_to() {
        let mut d = uac_dialog(OK_2XX);
        let local = "127.0.0.1:5060".parse().unwrap();
        let ack = parse_req(&d.ack(7, local, &[]));
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(ack.uri, "sip:psap@10.0.0.9:5080");
        assert_eq!(ack.cseq, 7);
        assert_eq!(ack.cseq_method, Method::Ack);
        assert_eq!(ack.from.tag(), Some("ours"));
        assert_eq!(ack.from.uri, "sip:+15551234567@127.0.0.1:5060");
        assert_eq!(ack.to.tag(), Some("theirs"));
        assert_eq!(ack.call_id, "uac1");
        assert_ne!(ack.top_via().branch.as_deref(), Some("z9hG4bK-inv"));
        assert!(ack.top_via().has_rfc3261_branch());
        let routes: Vec<&str> = ack.headers_named("Route").collect();
        assert_eq!(
            routes,
            vec![
                "<sip:p3.example;lr>",
                "<sip:p2.example;lr>",
                "<sip:p1.example;lr>"
            ]
        );
        // The ACK does not use up a CSeq number; the BYE takes the next one.
        assert_eq!(d.local_cseq, 7);
        let (bytes, branch) = d.request(&Method::Bye, local, &[], None);
        let bye = parse_req(&bytes);
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.uri, "sip:psap@10.0.0.9:5080");
        assert_eq!(bye.cseq, 8);
        assert_eq!(bye.from.tag(), Some("ours"));
        assert_eq!(bye.to.tag(), Some("theirs"));
        assert_eq!(bye.top_via().branch.as_deref(), Some(branch.as_str()));
        let routes: Vec<&str> = bye.headers_named("Route").collect();
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0], "<sip:p3.example;lr>");
        // The remote CSeq starts empty: any first request from the peer is in order.
        assert!(d.check_remote_cseq(1).is_ok());
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
