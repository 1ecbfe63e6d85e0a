//! What the UA core hands the application, and how: events are never dropped.

use super::*;

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
    /// No ACK came for our 2xx to the dialog's INVITE: the peer is gone. (A request we send in
    /// a dialog that gets no answer is a [`DialogEvent::RequestOutcome`] with code 408.)
    Timeout,
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

/// Events for one listener, in order: into its channel while there is room, else into a
/// bounded backlog that [`Command::Room`] flushes.
pub(super) struct EventQueue<T> {
    pub(super) tx: mpsc::Sender<T>,
    pub(super) backlog: VecDeque<T>,
    /// A task waits for room in the channel.
    pub(super) waiting: bool,
    /// The listener fell [`MAX_EVENT_BACKLOG`] behind; its dialog is being ended and later
    /// events are not queued.
    pub(super) overflowed: bool,
}

/// What became of an event given to an [`EventQueue`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Queued {
    /// In the channel, or queued behind others (with a task waiting for room).
    Taken,
    /// Queued, and a task must now wait for room ([`UaCore::wait_for_room`]).
    NeedsWaiter,
    /// Queued last: the listener is too far behind, its dialog must end.
    Overflow,
    /// The listener is gone (or the dialog is being ended for its backlog): dropped.
    Gone,
}

impl<T> EventQueue<T> {
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

    /// Move what fits from the backlog into the channel; whether some is left (and a task must
    /// wait for room again).
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
}

impl UaCore {
    /// Hand `ev` to dialog `d`'s listener, now or, when it is behind, in order later (see the
    /// module docs); never dropped while the listener is there.
    pub(super) fn dialog_event(&mut self, d: DialogId, ev: DialogEvent) {
        let Some(de) = self.dialogs.get_mut(&d) else {
            return;
        };
        match de.events.push(ev) {
            Queued::Taken => {}
            Queued::NeedsWaiter => match &de.events {
                EventSink::Call(q) => {
                    let tx = q.tx.clone();
                    self.wait_for_room(d, tx);
                }
                EventSink::Leg(q) => {
                    let tx = q.tx.clone();
                    self.wait_for_room(d, tx);
                }
                EventSink::Detached => {}
            },
            Queued::Overflow => self.backlogged.push(d),
            Queued::Gone => debug!("call not listening; dialog event dropped"),
        }
    }

    /// Have a task wait until `tx` (dialog `d`'s listener) has room, then tell this core
    /// ([`Command::Room`]).
    pub(super) fn wait_for_room<T: Send + 'static>(&self, d: DialogId, tx: mpsc::Sender<T>) {
        let (cmd, cancel) = (self.cmd_tx.clone(), self.cancel.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                room = tx.reserve() => {
                    drop(room);
                    let _ = cmd.send(Command::Room { dialog: d }).await;
                }
            }
        });
    }

    /// Dialog `d`'s listener has room: deliver what waits for it.
    pub(super) fn on_room(&mut self, d: DialogId) {
        if let Some(de) = self.dialogs.get_mut(&d) {
            match &mut de.events {
                EventSink::Call(q) => {
                    if q.flush() {
                        let tx = q.tx.clone();
                        self.wait_for_room(d, tx);
                    }
                }
                EventSink::Leg(q) => {
                    if q.flush() {
                        let tx = q.tx.clone();
                        self.wait_for_room(d, tx);
                    }
                }
                EventSink::Detached => {}
            }
        } else if let Some(leg) = self.outbound.get_mut(&d) {
            if leg.events.flush() {
                let tx = leg.events.tx.clone();
                self.wait_for_room(d, tx);
            }
        }
    }

    /// A listener whose dialog is over: a task hands it what is still queued, in order (for
    /// up to [`DRAIN_WITHIN`]), then the channel closes.
    pub(super) fn drain_later<T: Send + 'static>(&self, q: EventQueue<T>) {
        let EventQueue { tx, backlog, .. } = q;
        if backlog.is_empty() {
            return;
        }
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let deliver = async {
                for ev in backlog {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                done = tokio::time::timeout(DRAIN_WITHIN, deliver) => {
                    if done.is_err() {
                        warn!("a call did not take its last SIP events in time; dropped");
                    }
                }
            }
        });
    }

    /// End the dialogs whose listener fell [`MAX_EVENT_BACKLOG`] events behind, as if the call
    /// had released them, and count them.
    pub(super) async fn end_backlogged(&mut self, now: Instant) {
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
            self.release_dialog(d, now).await;
        }
    }
}
