//! What the UA core hands the application, and how: events are never dropped.
//!
//! Owns the public event types ([`IncomingCall`], [`AppEvent`], [`DialogEvent`], [`LegEvent`])
//! and their delivery: each listener's events go into its bounded channel while there is
//! room, else in order into a bounded backlog ([`EventQueue`]) that the driver flushes when
//! the listener has room again ([`Action::WaitForRoom`], [`super::handle::Command::Room`]). A listener more
//! than [`MAX_EVENT_BACKLOG`] behind has its dialog ended (`Core::end_backlogged`). Nothing
//! here waits: the waiting is the driver's. It does not touch transactions or dialogs' state
//! beyond their event sinks.

use super::core::{Action, Core};
use super::handle::DialogHandle;
use super::DialogId;
use crate::sip::message::{Header, Method, NameAddr};
use crate::sip::refer::{ReferError, ReferTo};
use crate::sip::transport::Transport;
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// A new call for the application.
#[derive(Debug)]
pub struct IncomingCall {
    pub handle: DialogHandle,
    pub events: mpsc::Receiver<DialogEvent>,
    pub call_id: String,
    pub from: NameAddr,
    pub to: NameAddr,
    pub request_uri: String,
    pub source: SocketAddr,
    pub transport: Transport,
    /// The SIP address the INVITE arrived on.
    pub local: SocketAddr,
    pub content_type: Option<String>,
    pub body: Bytes,
    pub headers: Vec<Header>,
    /// The agent whose phone placed this call: its From names an agent logged in from this
    /// source, and the INVITE carried that agent's digest credentials (the UA challenged it
    /// first). `None` for every other caller.
    pub agent: Option<String>,
}

/// Events the UA core raises for the application.
#[derive(Debug)]
pub enum AppEvent {
    Invite(IncomingCall),
}

/// What happens to a dialog, as its call sees it.
#[derive(Debug)]
pub enum DialogEvent {
    /// The ACK for our 2xx arrived. `sdp`: its body, which is the answer when our 2xx carried
    /// the offer (to an INVITE or re-INVITE that had none, RFC 3261 §13.2.1 and §14); empty
    /// otherwise.
    Confirmed { sdp: Bytes },
    /// The caller cancelled before we answered (the UA already sent 487).
    Cancelled,
    /// The caller hung up (the UA already answered 200).
    Bye,
    /// A re-INVITE or UPDATE; answer with [`DialogHandle::answer_reoffer`] using `txn`.
    Reoffer {
        txn: u64,
        method: Method,
        content_type: Option<String>,
        body: Bytes,
    },
    /// INFO (the UA already answered 200).
    Info { content_type: String, body: Bytes },
    /// The final response to a request we sent in this dialog (`req` from [`DialogHandle::request`]).
    RequestOutcome { req: u64, method: Method, code: u16 },
    /// A NOTIFY inside the dialog (REFER progress), already answered 200.
    Notify { event: String, body: Bytes },
    /// A REFER inside the dialog (RFC 3515): the phone asks us to transfer the call. Answer
    /// it with [`DialogHandle::answer_request`] (202, or a refusal) using its `txn`.
    Refer(Box<Refer>),
    /// No ACK came for our 2xx to the dialog's INVITE: the peer is gone. (A request we send in
    /// a dialog that gets no answer is a [`DialogEvent::RequestOutcome`] with code 408.)
    Timeout,
    /// The browser's WebSocket the dialog ran over closed and it did not come back within the
    /// grace period: nothing can reach it, and the UA has forgotten the dialog (no BYE).
    Lost,
}

/// A REFER received in a dialog, its headers parsed at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Refer {
    /// Answer with [`DialogHandle::answer_request`].
    pub txn: u64,
    /// The REFER's CSeq number: the NOTIFYs of a REFER after the first in its dialog name it
    /// (`Event: refer;id=`, RFC 3515 §2.4.6).
    pub cseq: u32,
    /// Where to transfer the call, or why `Refer-To` cannot be used (answer 400).
    pub refer_to: Result<ReferTo, ReferError>,
    /// The `Referred-By` URI, if any.
    pub referred_by: Option<String>,
    /// The dialog of ours that `Refer-To`'s `Replaces` names (matched on its Call-ID and both
    /// tags, whichever side the phone took for "to"), if it names one; `None` without
    /// `Replaces` or when it names no dialog we hold (answer 481).
    pub replaces_dialog: Option<DialogId>,
}

/// What happens to an outbound call (UAC leg), as its owner sees it.
#[derive(Debug)]
pub enum LegEvent {
    /// A provisional response other than 100 (180 Ringing, 183 Session Progress...). `sdp`:
    /// its SDP body, if it has one: the far end's early media (RFC 3960) goes there.
    Provisional { code: u16, sdp: Option<Bytes> },
    /// A 2xx answered the INVITE; the UA has already ACKed it. `sdp` is the 2xx body (the answer).
    Answered { sdp: Bytes },
    /// The call did not happen: the final non-2xx response (already ACKed), 408 when nothing
    /// answered (timer B), 487 after a CANCEL (also when a 2xx crossed the CANCEL: that dialog
    /// is ACKed and BYEd at once), 503 when the target could not be used or reached.
    Failed { code: u16, reason: String },
    /// After [`LegEvent::Answered`]: what happens in the dialog, exactly as for inbound calls
    /// (Bye, Info, Notify, Reoffer, RequestOutcome...).
    Dialog(DialogEvent),
}

/// Most events a dialog's listener may be behind beyond its channel; one more and the call
/// is ended (see the module docs).
pub const MAX_EVENT_BACKLOG: usize = 64;

/// How long the events queued for a dialog that has ended wait for its listener to take them.
pub(super) const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// A listener's channel, for the driver to wait on until it has room.
#[derive(Debug)]
pub(super) enum Listener {
    Call(mpsc::Sender<DialogEvent>),
    Leg(mpsc::Sender<LegEvent>),
}

impl Listener {
    /// Wait until the channel has room for one event (or is closed).
    pub(super) async fn room(&self) {
        let _ = match self {
            Listener::Call(tx) => tx.reserve().await.map(drop),
            Listener::Leg(tx) => tx.reserve().await.map(drop),
        };
    }
}

/// The events still queued for a listener whose dialog is over.
#[derive(Debug)]
pub(super) enum Backlog {
    Call(mpsc::Sender<DialogEvent>, VecDeque<DialogEvent>),
    Leg(mpsc::Sender<LegEvent>, VecDeque<LegEvent>),
}

impl Backlog {
    /// Hand the events over in order, waiting for room; stop if the listener goes.
    pub(super) async fn deliver(self) {
        async fn each<T>(tx: mpsc::Sender<T>, events: VecDeque<T>) {
            for ev in events {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
        match self {
            Backlog::Call(tx, events) => each(tx, events).await,
            Backlog::Leg(tx, events) => each(tx, events).await,
        }
    }
}

/// An event type a listener reads: what its channel is as a [`Listener`] or a [`Backlog`].
pub(super) trait Event: Sized {
    fn listener(tx: &mpsc::Sender<Self>) -> Listener;
    fn backlog(tx: mpsc::Sender<Self>, events: VecDeque<Self>) -> Backlog;
}

impl Event for DialogEvent {
    fn listener(tx: &mpsc::Sender<Self>) -> Listener {
        Listener::Call(tx.clone())
    }
    fn backlog(tx: mpsc::Sender<Self>, events: VecDeque<Self>) -> Backlog {
        Backlog::Call(tx, events)
    }
}

impl Event for LegEvent {
    fn listener(tx: &mpsc::Sender<Self>) -> Listener {
        Listener::Leg(tx.clone())
    }
    fn backlog(tx: mpsc::Sender<Self>, events: VecDeque<Self>) -> Backlog {
        Backlog::Leg(tx, events)
    }
}

/// Events for one listener, in order: into its channel while there is room, else into a
/// bounded backlog that [`super::handle::Command::Room`] flushes.
pub(super) struct EventQueue<T> {
    pub(super) tx: mpsc::Sender<T>,
    backlog: VecDeque<T>,
    /// The driver waits for room in the channel.
    waiting: bool,
    /// The listener fell [`MAX_EVENT_BACKLOG`] behind; its dialog is being ended and later
    /// events are not queued.
    overflowed: bool,
}

/// What became of an event given to an [`EventQueue`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Queued {
    /// In the channel, or queued behind others (with the driver waiting for room).
    Taken,
    /// Queued, and the driver must now wait for room ([`Action::WaitForRoom`]).
    NeedsWaiter,
    /// Queued last: the listener is too far behind, its dialog must end.
    Overflow,
    /// The listener is gone (or the dialog is being ended for its backlog): dropped.
    Gone,
}

impl<T: Event> EventQueue<T> {
    pub(super) fn new(tx: mpsc::Sender<T>) -> Self {
        EventQueue {
            tx,
            backlog: VecDeque::new(),
            waiting: false,
            overflowed: false,
        }
    }

    pub(super) fn push(&mut self, ev: T) -> Queued {
        if self.overflowed || self.tx.is_closed() {
            return Queued::Gone;
        }
        if self.backlog.is_empty() {
            match self.tx.try_send(ev) {
                Ok(()) => return Queued::Taken,
                Err(mpsc::error::TrySendError::Closed(_)) => return Queued::Gone,
                Err(mpsc::error::TrySendError::Full(ev)) => self.backlog.push_back(ev),
            }
        } else {
            self.backlog.push_back(ev);
        }
        if self.backlog.len() > MAX_EVENT_BACKLOG {
            self.overflowed = true;
            return Queued::Overflow;
        }
        if self.waiting {
            Queued::Taken
        } else {
            self.waiting = true;
            Queued::NeedsWaiter
        }
    }

    /// Move what fits from the backlog into the channel; whether some is left (and the driver
    /// must wait for room again).
    pub(super) fn flush(&mut self) -> bool {
        self.waiting = false;
        while let Some(ev) = self.backlog.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    self.waiting = true;
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return false;
                }
            }
        }
        false
    }

    /// `last` after whatever is queued (the listener's last event, its dialog being over).
    pub(super) fn push_last(&mut self, last: T) {
        if self.tx.is_closed() {
            return;
        }
        if self.backlog.is_empty() {
            if let Err(mpsc::error::TrySendError::Full(ev)) = self.tx.try_send(last) {
                self.backlog.push_back(ev);
            }
        } else {
            self.backlog.push_back(last);
        }
    }

    /// The listener's channel, to wait on.
    pub(super) fn listener(&self) -> Listener {
        T::listener(&self.tx)
    }

    /// What is still queued, for a listener whose dialog is over; none when nothing is.
    pub(super) fn into_backlog(self) -> Option<Backlog> {
        (!self.backlog.is_empty()).then(|| T::backlog(self.tx, self.backlog))
    }
}

/// Who hears a dialog's events.
pub(super) enum EventSink {
    /// An inbound call.
    Call(EventQueue<DialogEvent>),
    /// An outbound leg: events are wrapped in [`LegEvent::Dialog`].
    Leg(EventQueue<LegEvent>),
    /// Nobody: a dialog kept only to end it (a 2xx that crossed our CANCEL, another fork).
    Detached,
}

impl EventSink {
    pub(super) fn push(&mut self, ev: DialogEvent) -> Queued {
        match self {
            EventSink::Call(q) => q.push(ev),
            EventSink::Leg(q) => q.push(LegEvent::Dialog(ev)),
            EventSink::Detached => Queued::Taken,
        }
    }

    fn listener(&self) -> Option<Listener> {
        match self {
            EventSink::Call(q) => Some(q.listener()),
            EventSink::Leg(q) => Some(q.listener()),
            EventSink::Detached => None,
        }
    }

    /// Move what fits into the channel; the listener to wait on if some is left.
    fn flush(&mut self) -> Option<Listener> {
        match self {
            EventSink::Call(q) => q.flush().then(|| q.listener()),
            EventSink::Leg(q) => q.flush().then(|| q.listener()),
            EventSink::Detached => None,
        }
    }

    /// What is still queued, for a listener whose dialog is over.
    pub(super) fn into_backlog(self) -> Option<Backlog> {
        match self {
            EventSink::Call(q) => q.into_backlog(),
            EventSink::Leg(q) => q.into_backlog(),
            EventSink::Detached => None,
        }
    }
}

impl Core {
    /// Hand `ev` to dialog `d`'s listener, now or, when it is behind, in order later (see the
    /// module docs); never dropped while the listener is there.
    pub(super) fn dialog_event(&mut self, d: DialogId, ev: DialogEvent) {
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        let queued = de.events.push(ev);
        let listener = de.events.listener();
        self.queued(
            d,
            queued,
            listener,
            "call not listening; dialog event dropped",
        );
    }

    /// Carry out what [`EventQueue::push`] says for listener `listener` of dialog `d`.
    pub(super) fn queued(
        &mut self,
        d: DialogId,
        queued: Queued,
        listener: Option<Listener>,
        gone: &'static str,
    ) {
        match queued {
            Queued::Taken => {}
            Queued::NeedsWaiter => {
                if let Some(l) = listener {
                    self.act(Action::WaitForRoom(d, l));
                }
            }
            Queued::Overflow => self.backlogged.push(d),
            Queued::Gone => debug!("{gone}"),
        }
    }

    /// Dialog `d`'s listener has room: deliver what waits for it.
    pub(super) fn on_room(&mut self, d: DialogId) {
        let again = if let Some(de) = self.dialogs.get_mut(&d) {
            de.events.flush()
        } else if let Some(leg) = self.initiator.legs.get_mut(&d) {
            leg.events.flush().then(|| leg.events.listener())
        } else {
            None
        };
        if let Some(l) = again {
            self.act(Action::WaitForRoom(d, l));
        }
    }

    /// A listener whose dialog is over: the driver hands it what is still queued, in order
    /// (for up to [`DRAIN_WITHIN`]), then the channel closes.
    pub(super) fn drain_later(&mut self, backlog: Option<Backlog>) {
        if let Some(b) = backlog {
            self.act(Action::Drain(b));
        }
    }

    /// End the dialogs whose listener fell [`MAX_EVENT_BACKLOG`] events behind, as if the call
    /// had released them, and count them.
    pub(super) fn end_backlogged(&mut self, now: Instant) {
        for d in std::mem::take(&mut self.backlogged) {
            warn!(
                dialog = d,
                backlog = MAX_EVENT_BACKLOG,
                "a call is not taking its SIP events; ending it"
            );
            if let Some(m) = &self.metrics {
                m.add(
                    "ivr311_calls_ended_backlogged_total",
                    "Calls and outbound legs ended because they fell too far behind their SIP events.",
                    &[],
                    1,
                );
            }
            self.stats.ended_backlogged.fetch_add(1, Ordering::Relaxed);
            self.release_dialog(d, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: u8) -> DialogEvent {
        DialogEvent::Info {
            content_type: "application/dtmf-relay".into(),
            body: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn a_full_channel_queues_in_order_asks_for_one_waiter_and_overflows_past_the_bound() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut q = EventQueue::new(tx);
        assert_eq!(q.push(info(0)), Queued::Taken);
        assert_eq!(q.push(info(1)), Queued::Taken);
        assert_eq!(q.push(info(2)), Queued::NeedsWaiter, "full: one waiter");
        assert_eq!(
            q.push(info(3)),
            Queued::Taken,
            "the waiter is there already"
        );
        // The listener reads two; the flush moves the backlog in, in order.
        for want in 0..2 {
            assert!(matches!(rx.try_recv(), Ok(DialogEvent::Info { body, .. }) if body[0] == want));
        }
        assert!(!q.flush(), "all moved");
        for want in 2..4 {
            assert!(matches!(rx.try_recv(), Ok(DialogEvent::Info { body, .. }) if body[0] == want));
        }
        // A listener that stops reading: past the bound its dialog must end, and later events
        // are not queued.
        let mut overflowed = false;
        for n in 0..(2 + MAX_EVENT_BACKLOG + 1) {
            match q.push(info(n as u8)) {
                Queued::Overflow => {
                    overflowed = true;
                    break;
                }
                Queued::Gone => panic!("dropped at {n}"),
                _ => {}
            }
        }
        assert!(overflowed);
        assert_eq!(q.push(info(0)), Queued::Gone);
        // What was queued is still handed over, after the call ended.
        let Some(Backlog::Call(_, left)) = q.into_backlog() else {
            panic!("a backlog")
        };
        assert_eq!(left.len(), MAX_EVENT_BACKLOG + 1);
    }

    #[test]
    fn a_last_event_goes_after_what_is_queued() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut q = EventQueue::new(tx);
        q.push(LegEvent::Provisional {
            code: 180,
            sdp: None,
        });
        q.push(LegEvent::Provisional {
            code: 183,
            sdp: None,
        });
        q.push_last(LegEvent::Failed {
            code: 487,
            reason: "Request Terminated".into(),
        });
        assert!(matches!(
            rx.try_recv(),
            Ok(LegEvent::Provisional { code: 180, .. })
        ));
        let Some(Backlog::Leg(_, left)) = q.into_backlog() else {
            panic!("a backlog")
        };
        let codes: Vec<u16> = left
            .iter()
            .map(|e| match e {
                LegEvent::Provisional { code, .. } | LegEvent::Failed { code, .. } => *code,
                _ => 0,
            })
            .collect();
        assert_eq!(codes, [183, 487]);
    }
}
