//! Session timers (RFC 4028) on the calls we answer: when our refresh goes, when a caller that
//! stopped refreshing is hung up, and what a refresh's answer means.
//!
//! What the INVITE asks and what our 2xx says is [`crate::sip::session_timer`]'s (sans-IO,
//! no dialog); this file is its glue to the dialogs: each dialog's timer and its deadline live
//! in its entry, the deadline on the core's timers table. It sends through
//! [`Core::send_request`] and ends calls through [`Core::send_bye`]; it never answers a request.

use super::core::{Core, TimerRef};
use super::events::DialogEvent;
use super::DialogId;
use crate::sip::dialog::DialogState;
use crate::sip::message::Method;
use crate::sip::session_timer::{self, SessionTimer};
use bytes::Bytes;
use std::time::Instant;
use tracing::{debug, info};

/// The `req` number of the UA core's own session refreshes (RFC 4028), whose outcomes it keeps
/// (calls number theirs from 0 up).
pub(super) const SESSION_REFRESH: u64 = u64::MAX;

impl Core {
    /// (Re)start dialog `d`'s session timer from `now`, if it has one.
    pub(super) fn arm_session_timer(&mut self, d: DialogId, now: Instant) {
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        let Some(t) = de.session else { return };
        let at = now + t.next_action_after();
        de.session_due = Some(at);
        self.arm(at, TimerRef::Session(d));
    }

    /// A re-INVITE or UPDATE of dialog `d`, which `asked` for a session timer or not, is being
    /// answered 2xx with `body`: the session is refreshed. Returns the timer, for the 2xx's
    /// headers.
    pub(super) fn refresh_session(
        &mut self,
        d: DialogId,
        asked: session_timer::Ask,
        body: Option<&(String, Bytes)>,
        now: Instant,
    ) -> Option<SessionTimer> {
        let de = self.dialogs.get_mut(&d)?;
        if let Some((_, sdp)) = body.filter(|(ct, _)| ct.starts_with("application/sdp")) {
            de.local_sdp = sdp.clone();
        }
        let old = de.session?;
        if let session_timer::Ask::Timer(mut t) = asked {
            t.use_update |= old.use_update;
            de.session = Some(t);
        }
        let t = de.session;
        self.arm_session_timer(d, now);
        t
    }

    /// Dialog `d`'s session timer is due: send our refresh, or end a call whose caller has
    /// stopped refreshing.
    pub(super) fn on_session_timer(&mut self, d: DialogId, now: Instant) {
        let Some(de) = self.dialogs.get(&d) else {
            return;
        };
        let (Some(t), Some(due)) = (de.session, de.session_due) else {
            return;
        };
        if due > now || de.dialog.state != (DialogState::Confirmed { acked: true }) {
            return; // a stale entry (refreshed since), or not up (yet, or any more)
        }
        if t.we_refresh {
            let (method, body) = if t.use_update {
                (Method::Update, None)
            } else {
                let sdp = de.local_sdp.clone();
                (Method::Invite, Some(("application/sdp".to_owned(), sdp)))
            };
            debug!(?method, interval = t.interval, "session refresh (RFC 4028)");
            self.arm_session_timer(d, now);
            self.send_request(d, SESSION_REFRESH, method, t.refresh_headers(), body, now);
        } else {
            self.session_expired(d, now, "no session refresh from the caller");
        }
    }

    /// Our refresh got no answer (§10): the call ends, and its BYE goes when the call lets the
    /// dialog go.
    pub(super) fn on_refresh_unanswered(&mut self, d: DialogId) {
        info!("session timer: the caller did not answer our refresh; ending the call");
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.session = None;
        }
        self.dialog_event(d, DialogEvent::Bye);
    }

    /// The caller's answer to our session refresh: 408 or 481 mean the call is gone (§10);
    /// anything else (2xx, a 491 glare, a 501) leaves it up, refreshed or retried next time.
    pub(super) fn on_refresh_outcome(&mut self, d: DialogId, code: u16, now: Instant) {
        if matches!(code, 408 | 481) {
            self.session_expired(d, now, "the caller did not answer our session refresh");
        }
    }

    /// End dialog `d` for its session timer: the call hears BYE as from the caller, and the
    /// caller gets our BYE (RFC 4028 §10).
    fn session_expired(&mut self, d: DialogId, now: Instant, why: &str) {
        info!(why, "session timer: ending the call");
        self.dialog_event(d, DialogEvent::Bye);
        if let Some(de) = self.dialogs.get_mut(&d) {
            de.session = None;
        }
        self.send_bye(d, now);
    }
}
