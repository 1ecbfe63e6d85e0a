//! Our own registration with the trunk (`trunks.register`): the glue between the trunk core
//! ([`TrunkClient`] in [`crate::sip::trunk`], which decides what to send, when and where, and
//! owns the phase of reaching the registrar) and the UA core.
//!
//! It carries the trunk core's needs out as the UA core's: REGISTERs in client transactions of
//! their own, look-ups and TCP connections as [`Action`]s for the driver (their results come
//! back as [`super::handle::Command::TrunkResolved`] and [`super::handle::Command::TrunkConnected`]), the registrar's
//! connection held open; re-arms the registration's deadline, and publishes its status for
//! `/health` (logging each change of state once). It touches no dialog and no call.

use super::core::{Action, ClientEntry, ClientKey, ClientKind, Core, TimerRef};
use super::initiator::outbound_target;
use super::local_for;
use crate::sip::message::{Method, Response};
use crate::sip::transaction::ClientTransaction;
use crate::sip::transport::Flow;
use crate::sip::trunk::{Network, RegisterConfig, RegistrationStatus, TrunkClient, TrunkNeed};
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{debug, info, warn};

/// What the trunk registration asks of our sockets, as the UA core knows it.
struct Net<'a> {
    advertised: SocketAddr,
    is_open: &'a (dyn Fn(&Flow) -> bool + Send),
}

impl Network for Net<'_> {
    fn local_for(&self, remote: SocketAddr) -> SocketAddr {
        local_for(self.advertised, remote)
    }

    fn is_open(&self, flow: &Flow) -> bool {
        (self.is_open)(flow)
    }
}

impl Core {
    /// Register with the trunk as `cfg` says, from `now`, answering its challenges with the
    /// trunk's credentials (set them first). An unusable `cfg` is refused.
    pub(super) fn register_with_trunk(
        &mut self,
        cfg: RegisterConfig,
        now: Instant,
    ) -> Result<(), String> {
        cfg.check()?;
        // A host name is looked up before each REGISTER ([`TrunkClient`]); until then a
        // documentation address of our family stands in, for the checks.
        let by_name = crate::sip::resolve::needs_lookup(&cfg.registrar);
        let stand_in = if self.local.is_ipv4() {
            SocketAddr::from(([192, 0, 2, 1], 5060))
        } else {
            SocketAddr::from((
                std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
                5060,
            ))
        };
        if by_name {
            let host = crate::sip::message::uri_host_port(&cfg.registrar).map(|(h, _)| h);
            if !host.is_some_and(crate::sip::resolve::valid_hostname) {
                return Err(format!(
                    "trunks.register.registrar {:?}: the host is not an IP address or a name",
                    cfg.registrar
                ));
            }
        }
        let remote = outbound_target(
            &cfg.registrar,
            self.local,
            by_name.then_some(stand_in),
            true,
        )
        .map_err(|e| format!("trunks.register.registrar {:?}: {e}", cfg.registrar))?;
        let client = TrunkClient::new(cfg, self.initiator.auth.clone(), remote, now);
        self.trunk = Some(client);
        self.arm(now, TimerRef::TrunkRegister);
        self.publish_trunk_status(now);
        Ok(())
    }

    /// Run `f` on the trunk registration with the network as the UA core sees it, then carry
    /// out what it needs.
    fn with_trunk(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut TrunkClient, &Net<'_>) -> Vec<TrunkNeed>,
    ) {
        let net = Net {
            advertised: self.local,
            is_open: &*self.is_open,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| f(t, &net)) else {
            return;
        };
        self.carry_trunk(needs, now);
    }

    /// The trunk registration's deadline: send the REGISTER that is due, if any.
    pub(super) fn poll_trunk_registration(&mut self, now: Instant) {
        self.with_trunk(now, |t, net| t.poll(now, net));
    }

    /// The registrar's name was looked up.
    pub(super) fn on_trunk_resolved(
        &mut self,
        found: Result<Vec<SocketAddr>, String>,
        now: Instant,
    ) {
        self.with_trunk(now, |t, net| t.on_resolved(now, found, net));
    }

    /// The registrar's TCP connection was opened (or could not be).
    pub(super) fn on_trunk_connected(&mut self, opened: Result<Flow, String>, now: Instant) {
        self.with_trunk(now, |t, net| t.on_connected(now, opened, net));
    }

    /// The server is draining: remove our binding so the trunk sends new calls elsewhere.
    pub(super) fn unregister_trunk(&mut self, now: Instant) {
        self.with_trunk(now, |t, net| {
            let needs = t.unregister(net);
            if !needs.is_empty() {
                info!("draining: removing our registration with the trunk");
            }
            needs
        });
    }

    /// The final response to one of our REGISTERs (`key`).
    pub(super) fn on_trunk_register_final(
        &mut self,
        key: &ClientKey,
        resp: &Response,
        now: Instant,
    ) {
        self.with_trunk(now, |t, _| t.on_final(now, &key.0, resp));
    }

    /// One of our REGISTERs (`key`) got no final response (timer F).
    pub(super) fn on_trunk_register_timeout(&mut self, key: &ClientKey, now: Instant) {
        self.with_trunk(now, |t, _| {
            t.on_timeout(now, &key.0);
            Vec::new()
        });
    }

    /// Do what the trunk registration needs: look-ups and connections by the driver (their
    /// results come back as commands), REGISTERs in client transactions of their own.
    fn carry_trunk(&mut self, needs: Vec<TrunkNeed>, now: Instant) {
        for need in needs {
            match need {
                TrunkNeed::Resolve(uri) => self.act(Action::ResolveTrunk(uri)),
                TrunkNeed::Connect(remote) => self.act(Action::ConnectTrunk(remote)),
                TrunkNeed::Hold(flow) => self.act(Action::Hold(flow)),
                TrunkNeed::Release(flow) => self.act(Action::Release(flow)),
                TrunkNeed::Send(flow, out) => {
                    let key = (out.branch, Method::Register);
                    let (tx, first) =
                        ClientTransaction::new(now, false, flow.transport.is_reliable(), out.bytes);
                    let entry = ClientEntry::new(
                        tx,
                        flow,
                        ClientKind::TrunkRegister,
                        Method::Register,
                        None,
                    );
                    self.start_client(key, entry, first);
                }
            }
        }
        self.after_trunk_change(now);
    }

    /// Re-arm the registration's deadline, publish its status, and log a change of state.
    fn after_trunk_change(&mut self, now: Instant) {
        if let Some(at) = self.trunk.as_ref().and_then(TrunkClient::due) {
            self.arm(at, TimerRef::TrunkRegister);
        }
        let before = self
            .stats
            .trunk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, s)| (s.state.clone(), s.last_error.clone()));
        let Some(s) = self.publish_trunk_status(now) else {
            return;
        };
        if before == Some((s.state.clone(), s.last_error.clone())) {
            return;
        }
        match s.state.as_str() {
            "registered" => {
                info!(aor = %s.aor, registrar = %s.registrar, expires_in = ?s.expires_in, "registered with the trunk")
            }
            "failed" => warn!(
                aor = %s.aor,
                registrar = %s.registrar,
                error = s.last_error.as_deref().unwrap_or_default(),
                retry_in = ?s.retry_in,
                "registration with the trunk failed; calls from it cannot reach us until it succeeds"
            ),
            _ => debug!(state = %s.state, "trunk registration"),
        }
    }

    /// Put the registration's status where `/health` reads it ([`super::UaStats`]).
    fn publish_trunk_status(&self, now: Instant) -> Option<RegistrationStatus> {
        let status = self.trunk.as_ref().map(|r| r.status(now));
        *self.stats.trunk.lock().unwrap_or_else(|e| e.into_inner()) =
            status.clone().map(|s| (now, s));
        status
    }
}
