//! Agents logging in: REGISTER through the registrar, contacts, binding expiry.

use super::*;

impl UaCore {
    /// REGISTER (never part of a dialog): the registrar answers, through a server transaction
    /// so that retransmissions get the same answer and are not counted twice.
    pub(super) async fn on_register(
        &mut self,
        req: Request,
        key: ServerKey,
        flow: Flow,
        now: Instant,
    ) {
        let Some(registrar) = self.registrar.as_mut() else {
            let resp = self
                .response(&req, 403, "Forbidden", None)
                .header("Warning", "399 ivr311 \"no agents configured\"")
                .build();
            self.new_server_and_respond(key, req, flow, None, 403, resp, now)
                .await;
            return;
        };
        let (reply, events) = registrar.handle(now, &req, flow);
        let locks = registrar.locks(now);
        *self.stats.locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
        let mut b = self.response(&req, reply.code, reply.reason, None);
        for (name, value) in &reply.headers {
            b = b.header(name, value);
        }
        let resp = b.build();
        self.new_server_and_respond(key, req, flow, None, reply.code, resp, now)
            .await;
        self.on_agent_events(events);
        self.schedule_registrar();
    }

    /// Keep [`UaCore::agent_contacts`] current and pass the events on. The flow an agent's
    /// phone is reached over is held open while it is logged in: a phone registered over TCP
    /// may send nothing but keep-alives between registrations, and the connection is the only
    /// way to reach it.
    pub(super) fn on_agent_events(&mut self, events: Vec<AgentEvent>) {
        for ev in events {
            match &ev {
                AgentEvent::LoggedIn {
                    agent,
                    contact,
                    flow,
                } => {
                    self.transport.hold(flow);
                    if let Some((_, (_, old))) = self.agent_contacts.remove(agent) {
                        self.transport.release(&old);
                    }
                    self.agent_contacts
                        .insert(agent.clone(), (contact.clone(), *flow));
                }
                AgentEvent::LoggedOut { agent } => {
                    if let Some((_, (_, old))) = self.agent_contacts.remove(agent) {
                        self.transport.release(&old);
                    }
                }
            }
            let Some(tx) = &self.agent_tx else {
                continue;
            };
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    warn!(?ev, "agent event listener backlogged; event dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.agent_tx = None,
            }
        }
    }

    /// Make sure the timer heap wakes us for the registrar's next expiry.
    pub(super) fn schedule_registrar(&mut self) {
        let Some(next) = self.registrar.as_ref().and_then(Registrar::next_expiry) else {
            return;
        };
        if self.registrar_timer.is_some_and(|t| t <= next) {
            return;
        }
        self.registrar_timer = Some(next);
        self.timers.push(Reverse((next, TimerRef::Registrar)));
    }

    pub(super) fn on_registrar_timer(&mut self, now: Instant) {
        if self.registrar_timer.is_some_and(|t| t <= now) {
            self.registrar_timer = None;
        }
        let events = match self.registrar.as_mut() {
            Some(r) => r.expire(now),
            None => return,
        };
        self.on_agent_events(events);
        self.schedule_registrar();
    }
}
