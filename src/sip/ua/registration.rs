//! Our own registration with the trunk (`trunks.register`).

use super::*;

/// What the trunk registration asks of our sockets.
pub(super) struct UaNet<'a> {
    pub(super) transport: &'a TransportHandle,
    pub(super) advertised: SocketAddr,
}

impl Network for UaNet<'_> {
    fn local_for(&self, remote: SocketAddr) -> SocketAddr {
        local_for(self.advertised, remote)
    }

    fn is_open(&self, flow: &Flow) -> bool {
        self.transport.is_open(flow)
    }
}

impl UaCore {
    /// The trunk registration's timer: send the REGISTER that is due, if any.
    pub(super) async fn poll_trunk_registration(&mut self, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| t.poll(now, &net)) else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// The registrar's name was looked up: send the REGISTER that waited for it, or count the
    /// failure (retried later, as any other).
    pub(super) async fn on_trunk_resolved(
        &mut self,
        found: Result<Vec<SocketAddr>, String>,
        now: Instant,
    ) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| t.on_resolved(now, found, &net)) else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// The registrar's TCP connection was opened (or could not be).
    pub(super) async fn on_trunk_connected(&mut self, opened: Result<Flow, String>, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self
            .trunk
            .as_mut()
            .map(|t| t.on_connected(now, opened, &net))
        else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// The server is draining: remove our binding so the trunk sends new calls elsewhere.
    pub(super) async fn unregister_trunk(&mut self, now: Instant) {
        let net = UaNet {
            transport: &self.transport,
            advertised: self.local,
        };
        let Some(needs) = self.trunk.as_mut().map(|t| t.unregister(&net)) else {
            return;
        };
        if !needs.is_empty() {
            info!("draining: removing our registration with the trunk");
        }
        self.carry_trunk(needs, now).await;
    }

    pub(super) async fn on_trunk_register_final(
        &mut self,
        key: &ClientKey,
        resp: &Response,
        now: Instant,
    ) {
        let Some(needs) = self.trunk.as_mut().map(|t| t.on_final(now, &key.0, resp)) else {
            return;
        };
        self.carry_trunk(needs, now).await;
    }

    /// Do what the trunk registration needs: look-ups and connections off this task (their
    /// results come back as commands), REGISTERs in client transactions of their own.
    pub(super) async fn carry_trunk(&mut self, needs: Vec<TrunkNeed>, now: Instant) {
        for need in needs {
            match need {
                TrunkNeed::Resolve(uri) => {
                    let (tx, bound) = (self.cmd_tx.clone(), self.transport.local_addr());
                    let resolver = self.resolver.clone();
                    self.tasks.spawn(async move {
                        let found = resolver.resolve_all(&uri, bound).await;
                        let _ = tx.send(Command::TrunkResolved(found)).await;
                    });
                }
                TrunkNeed::Connect(remote) => {
                    let (tx, transport) = (self.cmd_tx.clone(), self.transport.clone());
                    self.tasks.spawn(async move {
                        let opened = transport
                            .connect_tcp(remote)
                            .await
                            .map_err(|e| format!("TCP to {remote}: {e}"));
                        let _ = tx.send(Command::TrunkConnected(opened)).await;
                    });
                }
                TrunkNeed::Hold(flow) => self.transport.hold(&flow),
                TrunkNeed::Release(flow) => self.transport.release(&flow),
                TrunkNeed::Send(flow, out) => {
                    let key = (out.branch, Method::Register);
                    let (tx, first) =
                        ClientTransaction::new(now, false, flow.transport.is_reliable(), out.bytes);
                    self.start_client(
                        key,
                        ClientEntry {
                            tx,
                            flow,
                            dialog: None,
                            req: 0,
                            method: Method::Register,
                            kind: ClientKind::TrunkRegister,
                            invite: None,
                            acks: HashMap::new(),
                        },
                        first,
                    )
                    .await;
                }
            }
        }
        self.after_trunk_change(now);
    }

    /// Re-arm the registration's timer, publish its status, and log a change of state.
    pub(super) fn after_trunk_change(&mut self, now: Instant) {
        if let Some(at) = self.trunk.as_ref().and_then(TrunkClient::due) {
            self.timers.push(Reverse((at, TimerRef::TrunkRegister)));
        }
        let before = self
            .stats
            .trunk_registration()
            .map(|s| (s.state, s.last_error));
        let now_status = self.publish_trunk_status(now);
        let Some(s) = now_status else { return };
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

    pub(super) fn publish_trunk_status(&self, now: Instant) -> Option<RegistrationStatus> {
        let status = self.trunk.as_ref().map(|r| r.status(now));
        *self.stats.trunk.lock().unwrap_or_else(|e| e.into_inner()) =
            status.clone().map(|s| (now, s));
        status
    }
}
