//! What a call did, as the call history keeps it ([`crate::history::CallRecord`]).
//!
//! The driver notes each fact as it carries out the core's actions and reads the results of
//! work (a ticket's number, the 911 audit row's id, the queue's answer, the operator's
//! answer), with the same `now` it feeds the core; at the end [`Facts::record`] turns them
//! into the call's row. Nothing here decides anything; the clock is read only to turn the
//! instants into wall time for the row ([`wall_ms`]).

use super::core::EndReason;
use super::setup::CallMeta;
use crate::history::{wall_ms, AbandonedIn, CallRecord, Outcome, QueueVisit};
use std::time::Instant;

#[derive(Debug, Default)]
struct InQueue {
    name: String,
    entered: Option<Instant>,
    /// Left unanswered (abandoned, chose something else, call-back).
    left: Option<Instant>,
    agent: Option<String>,
    connected: Option<Instant>,
    talk_ended: Option<Instant>,
}

/// One call's facts so far.
#[derive(Debug)]
pub(crate) struct Facts {
    arrived: Instant,
    answered: Instant,
    language: Option<String>,
    ticket_service: Option<String>,
    ticket_id: Option<u64>,
    audit_id: Option<i64>,
    queue: Option<InQueue>,
    callback: bool,
}

impl Facts {
    /// A call whose INVITE arrived at `arrived` and that we answered at `answered`.
    pub(crate) fn new(arrived: Instant, answered: Instant) -> Facts {
        Facts {
            arrived,
            answered,
            language: None,
            ticket_service: None,
            ticket_id: None,
            audit_id: None,
            queue: None,
            callback: false,
        }
    }

    pub(crate) fn language(&mut self, language: &str) {
        if self.language.as_deref() != Some(language) {
            self.language = Some(language.to_owned());
        }
    }

    /// A ticket for `service` is being filed.
    pub(crate) fn ticket(&mut self, service: &str) {
        self.ticket_service = Some(service.to_owned());
    }

    pub(crate) fn ticket_filed(&mut self, id: u64) {
        self.ticket_id = Some(id);
    }

    pub(crate) fn audited(&mut self, id: i64) {
        self.audit_id = Some(id);
    }

    /// The caller entered `queue` (a call enters one queue at most once it is answered).
    pub(crate) fn queued(&mut self, now: Instant, queue: &str) {
        if self.queue.is_none() {
            self.queue = Some(InQueue {
                name: queue.to_owned(),
                entered: Some(now),
                ..InQueue::default()
            });
        }
    }

    /// The caller left the queue without an operator.
    pub(crate) fn left_queue(&mut self, now: Instant) {
        if let Some(q) = &mut self.queue {
            if q.connected.is_none() && q.left.is_none() {
                q.left = Some(now);
            }
        }
    }

    pub(crate) fn operator_answered(&mut self, now: Instant, agent: &str) {
        if let Some(q) = &mut self.queue {
            if q.connected.is_none() {
                q.agent = Some(agent.to_owned());
                q.connected = Some(now);
            }
        }
    }

    pub(crate) fn operator_call_ended(&mut self, now: Instant) {
        if let Some(q) = &mut self.queue {
            if q.connected.is_some() && q.talk_ended.is_none() {
                q.talk_ended = Some(now);
            }
        }
    }

    /// The caller was transferred by `operator` to `target` at `now`: the queue event the
    /// history keeps (Asterisk's `TRANSFER`), if the caller came through a queue.
    pub(crate) fn transferred(
        &self,
        now: Instant,
        call_id: &str,
        operator: Option<String>,
    ) -> Option<crate::history::QueueEventRecord> {
        let q = self.queue.as_ref()?;
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_millis() as i64;
        Some(crate::history::QueueEventRecord {
            at_ms: wall_ms(now),
            call_id: Some(call_id.to_owned()),
            queue: q.name.clone(),
            agent: operator.or_else(|| q.agent.clone()),
            event: crate::history::QueueEventKind::Transfer,
            wait_ms: q.entered.zip(q.connected).map(|(e, c)| ms(e, c)),
            talk_ms: q.connected.map(|c| ms(c, now)),
            position: None,
        })
    }

    /// The caller's place was handed to a call-back.
    pub(crate) fn callback_kept(&mut self, now: Instant) {
        self.left_queue(now);
        self.callback = true;
    }

    /// The call's row, as it ended at `end` with the core's `outcome`
    /// ([`super::core::CallCore::outcome`]).
    pub(crate) fn record(
        &self,
        end: Instant,
        meta: &CallMeta,
        outcome: &str,
        reason: EndReason,
        menu_path: String,
    ) -> CallRecord {
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_millis() as i64;
        let queue = self.queue.as_ref().map(|q| {
            let entered = q.entered.unwrap_or(self.answered);
            let until = q.connected.or(q.left).unwrap_or(end);
            QueueVisit {
                queue: q.name.clone(),
                entered_ms: wall_ms(entered),
                wait_ms: ms(entered, until),
                agent: q.agent.clone(),
                talk_ms: q.connected.map(|c| ms(c, q.talk_ended.unwrap_or(end))),
            }
        });
        let outcome = if outcome == "emergency" {
            Outcome::Emergency {
                audit_id: self.audit_id,
            }
        } else if self.queue.as_ref().is_some_and(|q| q.agent.is_some()) {
            Outcome::Bridged
        } else if self.callback {
            Outcome::Callback
        } else if let Some(service) = &self.ticket_service {
            Outcome::Ticket {
                id: self.ticket_id,
                service: service.clone(),
            }
        } else if outcome == "info" {
            Outcome::Info
        } else if let Some(q) = &self.queue {
            // Asked for an operator and never reached one: abandoned in the queue, after
            // the wait.
            let entered = q.entered.unwrap_or(self.answered);
            Outcome::Abandoned {
                at: AbandonedIn::Queue,
                after_ms: ms(entered, q.left.unwrap_or(end)),
            }
        } else {
            Outcome::Abandoned {
                at: AbandonedIn::Menu,
                after_ms: ms(self.answered, end),
            }
        };
        CallRecord {
            call_id: meta.call_id.clone(),
            started_ms: wall_ms(self.arrived),
            answered_ms: Some(wall_ms(self.answered)),
            ended_ms: wall_ms(end),
            caller: meta.caller.clone(),
            caller_verified: meta.identity.is_verified(),
            dialled: meta.dialled.clone(),
            language: self.language.clone(),
            menu_path: Some(menu_path),
            outcome,
            end_reason: Some(format!("{reason:?}")),
            queue,
        }
    }
}

/// The row of a call that never reached the answer: refused (`code`, `why`), or given up
/// by the caller while it rang (`code` `None`).
pub(crate) fn unanswered(
    arrived: Instant,
    end: Instant,
    call_id: &str,
    caller: &super::CallerIdentity,
    dialled: &str,
    refused: Option<(u16, &str)>,
) -> CallRecord {
    let outcome = match refused {
        Some((code, why)) => Outcome::Rejected {
            code,
            why: why.to_owned(),
        },
        None => Outcome::Abandoned {
            at: AbandonedIn::Ringing,
            after_ms: end.saturating_duration_since(arrived).as_millis() as i64,
        },
    };
    CallRecord {
        call_id: call_id.to_owned(),
        started_ms: wall_ms(arrived),
        answered_ms: None,
        ended_ms: wall_ms(end),
        caller: caller.number().to_owned(),
        caller_verified: caller.is_verified(),
        dialled: dialled.to_owned(),
        language: None,
        menu_path: None,
        outcome,
        end_reason: None,
        queue: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::CallerIdentity;
    use std::time::Duration;

    fn meta() -> CallMeta {
        CallMeta {
            call_id: "c@x".into(),
            caller: "+15551230000".into(),
            identity: CallerIdentity::Asserted("+15551230000".into()),
            dialled: "311".into(),
            line: "default".into(),
            answered_at: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn an_answered_operator_call_has_its_wait_and_talk() {
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        let mut f = Facts::new(t, s(1));
        f.language("es");
        f.queued(s(10), "general");
        f.operator_answered(s(25), "1001");
        f.operator_call_ended(s(85));
        let r = f.record(
            s(86),
            &meta(),
            "operator",
            EndReason::AgentHungUp,
            "x".into(),
        );
        assert_eq!(r.outcome, Outcome::Bridged);
        let q = r.queue.unwrap();
        assert_eq!((q.wait_ms, q.talk_ms), (15_000, Some(60_000)));
        assert_eq!(q.agent.as_deref(), Some("1001"));
        assert_eq!(r.language.as_deref(), Some("es"));
        assert!(r.caller_verified);
    }

    #[test]
    fn hanging_up_while_waiting_is_abandoned_in_the_queue_after_the_wait() {
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        let mut f = Facts::new(t, s(1));
        f.queued(s(10), "general");
        // The call's end takes the caller out of the queue.
        f.left_queue(s(50));
        let r = f.record(
            s(51),
            &meta(),
            "operator",
            EndReason::CallerHungUp,
            "x".into(),
        );
        assert_eq!(
            r.outcome,
            Outcome::Abandoned {
                at: AbandonedIn::Queue,
                after_ms: 40_000
            }
        );
        assert_eq!(r.queue.unwrap().wait_ms, 40_000);
    }

    #[test]
    fn leaving_the_queue_for_a_ticket_is_a_ticket_with_its_wait() {
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        let mut f = Facts::new(t, s(1));
        f.queued(s(10), "general");
        f.left_queue(s(30));
        f.ticket("potholes");
        f.ticket_filed(12345678);
        let r = f.record(s(90), &meta(), "ticket", EndReason::MenuHungUp, "x".into());
        assert_eq!(
            r.outcome,
            Outcome::Ticket {
                id: Some(12345678),
                service: "potholes".into()
            }
        );
        assert_eq!(r.queue.unwrap().wait_ms, 20_000);
    }
}
