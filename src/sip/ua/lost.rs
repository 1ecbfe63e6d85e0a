//! Flows that closed under us: a browser's WebSocket (RFC 7118) is its only path. When it
//! closes with no dialog over it, the agents registered over it are logged out at once (they
//! cannot be offered a call). With dialogs over it, both wait [`LOST_FLOW_GRACE`]: a browser
//! that connects again within it and registers the same contact (JsSIP keeps its contact for
//! the page's life and registers again as it reconnects) gets its dialogs back on the new
//! connection and its calls go on (the media never ran over the WebSocket). Otherwise, at the
//! end of the grace, its agents are logged out and the owner of each dialog hears
//! [`DialogEvent::Lost`] (no BYE can reach the browser) and the UA forgets it.
//!
//! Only WebSocket flows are reported lost (by [`crate::sip::transport::WsConn`]'s drop); a
//! TCP phone's connection is opened again by the phone itself and its dialogs are left alone.

use super::core::{Core, TimerRef};
use super::{DialogEvent, DialogId};
use crate::sip::transport::Flow;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tracing::info;

/// How long the dialogs of a closed WebSocket wait for the browser to come back.
pub const LOST_FLOW_GRACE: Duration = Duration::from_secs(5);

/// A closed flow whose dialogs wait out the grace.
#[derive(Debug)]
pub(super) struct LostFlow {
    /// The contacts that were registered over it: the same contact registered again over a
    /// new flow takes the dialogs.
    contacts: Vec<String>,
    dialogs: Vec<DialogId>,
    until: Instant,
}

/// Closed flows by connection id.
pub(super) type LostFlows = HashMap<u64, (Flow, LostFlow)>;

impl Core {
    /// The WebSocket connection of `flow` closed.
    pub(super) fn flow_lost(&mut self, now: Instant, flow: Flow) {
        let contacts: Vec<String> = self
            .agents
            .contacts
            .iter()
            .filter(|e| e.value().1 == flow)
            .map(|e| e.value().0.clone())
            .collect();
        let dialogs: Vec<DialogId> = self
            .dialogs
            .iter()
            .filter(|(_, de)| de.dialog.flow == flow)
            .map(|(d, _)| *d)
            .collect();
        if dialogs.is_empty() {
            self.log_out_flow(flow);
            return;
        }
        info!(remote = %flow.remote, dialogs = dialogs.len(), grace_seconds = LOST_FLOW_GRACE.as_secs(), "websocket closed under dialogs; they end unless it comes back");
        let until = now + LOST_FLOW_GRACE;
        self.lost.insert(
            flow.conn,
            (
                flow,
                LostFlow {
                    contacts,
                    dialogs,
                    until,
                },
            ),
        );
        self.arm(until, TimerRef::LostFlow(flow.conn));
    }

    /// `contact` registered over `flow`: the dialogs of a lost flow it was registered over
    /// move to `flow`.
    pub(super) fn flow_back(&mut self, contact: &str, flow: Flow) {
        let back: Vec<u64> = self
            .lost
            .iter()
            .filter(|(_, (old, l))| *old != flow && l.contacts.iter().any(|c| c == contact))
            .map(|(conn, _)| *conn)
            .collect();
        for conn in back {
            let Some((old, l)) = self.lost.remove(&conn) else {
                continue;
            };
            let mut moved = 0;
            for d in l.dialogs {
                if let Some(de) = self.dialogs.get_mut(&d) {
                    if de.dialog.flow == old {
                        de.dialog.flow = flow;
                        moved += 1;
                        self.act(super::core::Action::Hold(flow));
                    }
                }
            }
            info!(remote = %flow.remote, dialogs = moved, "the browser came back; its dialogs go on over its new connection");
        }
    }

    /// Drop the registrations made over `flow` (the agents log out).
    fn log_out_flow(&mut self, flow: Flow) {
        if let Some(registrar) = self.agents.registrar.as_mut() {
            let events = registrar.flow_closed(flow);
            self.on_agent_events(events);
        }
    }

    /// The grace of lost flow `conn` may be over.
    pub(super) fn on_lost_flow_timer(&mut self, now: Instant, conn: u64) {
        let due = self.lost.get(&conn).is_some_and(|(_, l)| l.until <= now);
        if !due {
            return;
        }
        let Some((flow, l)) = self.lost.remove(&conn) else {
            return;
        };
        self.log_out_flow(flow);
        for d in l.dialogs {
            let still = self
                .dialogs
                .get(&d)
                .is_some_and(|de| de.dialog.flow == flow);
            if still {
                info!(remote = %flow.remote, "the browser did not come back; its dialog is over");
                self.dialog_event(d, DialogEvent::Lost);
                self.remove_dialog(d);
            }
        }
    }
}
