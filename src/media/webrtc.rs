//! Browser legs (WebRTC): ICE-lite, DTLS-SRTP and SRTP for one leg's media, sans-IO.
//!
//! A browser (a WebRTC SIP phone, the operator console) will not take plain RTP: its audio
//! arrives as SRTP keyed by a DTLS handshake, on a path found by ICE. [`WebRtcLeg`] is our end
//! of one such leg, on one RTP port:
//!
//! - **ICE-lite** (RFC 8445 §2.5): we gather nothing and send no checks; our SDP names one host
//!   candidate (the port, at `media.advertise_ip` behind NAT) and the browser, the controlling
//!   agent, checks it. Each binding request that carries our ufrag and authenticates with our
//!   password (short-term credentials from the SDP, RFC 8489 §9.1) is answered, and its source
//!   becomes the browser's address; the pair it nominates (`USE-CANDIDATE`) wins. Media, DTLS
//!   and our answers go there only.
//! - **DTLS** (RFC 5763/5764, webrtc-rs `rtc-dtls`): server or client as the SDP's `a=setup`
//!   says (a browser answering our `actpass` is `active`, so we are usually the server; we
//!   answer a browser's offer `passive`). The certificate is the server's
//!   ([`DtlsIdentity`], one per process); the browser's must match the fingerprint in its SDP,
//!   checked when the handshake completes.
//! - **SRTP** (`rtc-srtp`): keys exported from the handshake (`EXTRACTOR-dtls_srtp`), AES-CM
//!   with HMAC-SHA1-80 or AES-GCM as negotiated; [`WebRtcLeg::protect`] and the inbound path of
//!   [`WebRtcLeg::handle_datagram`] are the per-packet work. RTCP shares the port
//!   (`rtcp-mux`); the browser's RTCP is read and dropped (we send none: a browser plays audio
//!   without it).
//!
//! Inputs (datagrams, the far end's SDP parameters, `now`) go in; datagrams to send
//! ([`WebRtcLeg::poll_transmit`]) and events ([`WebRtcEvent`]: connected, failed) come out.
//! No socket, no clock: the media clock ([`crate::media::clock`]) drives a leg from the thread
//! that owns its port, and the unit tests below drive two endpoints on virtual time.
//!
//! Demultiplexing is RFC 7983's first byte: 0–3 STUN, 20–63 DTLS, 128–191 RTP and RTCP
//! (told apart by the payload type, RFC 5761 §4). Anything else, and anything from an address
//! no authenticated check came from, is dropped.
//!
//! Failure ends the leg: no completed handshake within [`CONNECT_WITHIN`] of the far end's
//! SDP ([`WebRtcLeg::set_remote`]: a browser's answer comes when its operator picks up, however
//! long it rang), a handshake the far end aborts or whose certificate does not match, the browser's
//! `close_notify`, or nothing authenticated from it for [`CONSENT_WITHIN`] (RFC 7675: a browser
//! sends a consent check every 5 s or so). Each is reported once as [`WebRtcEvent::Failed`].

use crate::media::sdp::{Fingerprint, Setup, WebRtcLocal, WebRtcRemote};
use bytes::BytesMut;
use rtc_crypto::RTCCryptoProvider;
use rtc_dtls::config::{ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig};
use rtc_dtls::crypto::Certificate;
use rtc_dtls::endpoint::{Endpoint, EndpointEvent};
use rtc_dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc_shared::TransportProtocol;
use rtc_srtp::context::Context;
use rtc_srtp::protection_profile::ProtectionProfile;
use rtc_stun::attributes::{ATTR_USERNAME, ATTR_USE_CANDIDATE};
use rtc_stun::fingerprint::FINGERPRINT;
use rtc_stun::integrity::MessageIntegrity;
use rtc_stun::message::{Message, Setter, BINDING_REQUEST, BINDING_SUCCESS};
use rtc_stun::xoraddr::XorMappedAddress;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a leg has, from the far end's SDP, to finish ICE and the DTLS handshake.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(15);
/// How long a connected leg may go without an authenticated packet (a consent check or SRTP)
/// from the browser before it counts as gone (RFC 7675 §5.1 uses 30 s).
pub const CONSENT_WITHIN: Duration = Duration::from_secs(30);
/// DTLS records kept while the handshake's role is not known yet (the browser's ClientHello
/// can overtake the SIP answer that says who is the server).
const EARLY_DTLS: usize = 8;
/// Addresses whose checks authenticated that are remembered (the browser may check from
/// several candidates before it nominates one).
const MAX_VALIDATED: usize = 8;
/// The key our DTLS endpoint files the one association under: the association follows the
/// leg whatever address ICE settles on (as webrtc-rs's own peer connection does). Never sent
/// to: what the endpoint sends goes to the address ICE selected.
const DTLS_PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    9,
));
/// SRTP replay windows (packets), as browsers use.
const REPLAY_WINDOW: usize = 64;

/// Why a browser leg could not carry media, or stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebRtcError {
    /// The server's DTLS certificate could not be made (the crypto provider failed).
    #[error("cannot make the DTLS certificate: {0}")]
    Certificate(String),
    /// ICE and the DTLS handshake did not complete within [`CONNECT_WITHIN`].
    #[error("no ICE and DTLS within {0:?}")]
    Timeout(Duration),
    /// The DTLS handshake failed (the message is rtc-dtls's).
    #[error("DTLS handshake failed: {0}")]
    Handshake(String),
    /// The far end's certificate does not match the fingerprint in its SDP.
    #[error("the far end's DTLS certificate does not match its SDP fingerprint")]
    Fingerprint,
    /// The SDP fingerprint uses a hash we do not know (we take sha-256, sha-384, sha-512).
    #[error("unsupported fingerprint hash {0:?}")]
    FingerprintHash(String),
    /// The handshake agreed on no SRTP profile we can use, or the keys could not be derived.
    #[error("no usable SRTP keys: {0}")]
    Srtp(String),
    /// The browser closed DTLS (`close_notify`).
    #[error("the far end closed DTLS")]
    Closed,
    /// Nothing authenticated from the browser for [`CONSENT_WITHIN`].
    #[error("no consent from the far end for {0:?}")]
    ConsentExpired(Duration),
    /// Both ends asked for the same DTLS role (`a=setup`).
    #[error("both ends asked for the DTLS {0} role")]
    Role(&'static str),
}

/// The server's DTLS certificate, shared by every browser leg (browsers accept the same
/// certificate on many connections; a new one per leg would cost a key generation each).
pub struct DtlsIdentity {
    certificate: Certificate,
    fingerprint: Fingerprint,
    provider: Arc<dyn RTCCryptoProvider>,
}

impl std::fmt::Debug for DtlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsIdentity")
            .field("fingerprint", &self.fingerprint.to_sdp())
            .finish()
    }
}

impl DtlsIdentity {
    /// A new self-signed ECDSA P-256 certificate (what browsers make for themselves).
    pub fn generate() -> Result<Arc<DtlsIdentity>, WebRtcError> {
        let provider =
            rtc_crypto::default_provider().map_err(|e| WebRtcError::Certificate(e.to_string()))?;
        let certificate =
            Certificate::generate_self_signed(vec!["ivr311".to_owned()], provider.crypto())
                .map_err(|e| WebRtcError::Certificate(e.to_string()))?;
        let der = certificate
            .certificate
            .first()
            .ok_or_else(|| WebRtcError::Certificate("no certificate made".to_owned()))?;
        let fingerprint = Fingerprint {
            algorithm: "sha-256".to_owned(),
            value: Sha256::digest(der.as_ref()).to_vec(),
        };
        Ok(Arc::new(DtlsIdentity {
            certificate,
            fingerprint,
            provider,
        }))
    }

    /// The process's certificate, made on first use (a key generation, a few milliseconds)
    /// and shared by every browser leg after.
    pub fn shared() -> Result<Arc<DtlsIdentity>, WebRtcError> {
        static SHARED: std::sync::OnceLock<Result<Arc<DtlsIdentity>, WebRtcError>> =
            std::sync::OnceLock::new();
        SHARED.get_or_init(DtlsIdentity::generate).clone()
    }

    /// Our certificate's fingerprint, for `a=fingerprint`.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    fn handshake_config(&self, client: bool) -> Result<HandshakeConfig, WebRtcError> {
        ConfigBuilder::default()
            .with_crypto_provider(self.provider.clone())
            .with_certificates(vec![self.certificate.clone()])
            .with_srtp_protection_profiles(vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ])
            // The far end's certificate is self-signed: it is checked against its SDP's
            // fingerprint once the handshake completes, not against CAs.
            .with_client_auth(ClientAuthType::RequireAnyClientCert)
            .with_insecure_skip_verify(true)
            .with_extended_master_secret(ExtendedMasterSecretType::Require)
            .build(client, None)
            .map_err(|e| WebRtcError::Handshake(e.to_string()))
    }
}

/// What [`WebRtcLeg::handle_datagram`] made of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// An SRTP packet that authenticated: the plain RTP packet is now `buf[..len]`.
    Media { len: usize },
    /// STUN, DTLS or RTCP, taken care of (anything to send is queued).
    Handled,
    /// Not ours (unauthenticated, from an address ICE did not validate, garbage, a replay,
    /// or media before the keys): dropped.
    Dropped,
}

/// What a leg reports, once each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebRtcEvent {
    /// ICE found the browser at `remote` and the DTLS handshake completed: media flows.
    Connected {
        remote: SocketAddr,
        profile: &'static str,
    },
    /// The leg cannot carry media any more.
    Failed(WebRtcError),
}

/// The DTLS role we take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// Where the leg is.
enum State {
    /// Waiting for the browser's checks and handshake (or, as the offerer, for its answer).
    Connecting,
    /// Keys derived: media flows.
    Connected {
        inbound: Box<Context>,
        outbound: Box<Context>,
    },
    /// Over (the event said why).
    Failed,
}

/// Our end of one browser leg (see the module docs).
pub struct WebRtcLeg {
    identity: Arc<DtlsIdentity>,
    local: WebRtcLocal,
    remote: Option<WebRtcRemote>,
    role: Option<Role>,
    dtls: Option<Endpoint>,
    /// As the DTLS client: the handshake's configuration until ICE lets it start.
    client_config: Option<Arc<HandshakeConfig>>,
    /// The browser's records that came before we knew our role.
    early: VecDeque<BytesMut>,
    /// Where the browser is: the source of the nominated check, or of the first one until a
    /// nomination.
    selected: Option<SocketAddr>,
    nominated: bool,
    /// Sources of checks that authenticated.
    validated: Vec<SocketAddr>,
    state: State,
    started: Instant,
    /// The last authenticated packet from the browser.
    heard: Option<Instant>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<WebRtcEvent>,
}

impl std::fmt::Debug for WebRtcLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRtcLeg")
            .field("role", &self.role)
            .field("selected", &self.selected)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Random ICE characters (RFC 8839: ALPHA / DIGIT / "+" / "/").
fn ice_chars(n: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

impl WebRtcLeg {
    /// A leg that starts at `now` with fresh ICE credentials and SSRC, taking the DTLS role
    /// the far end's SDP leaves us ([`WebRtcLeg::set_remote`]); our SDP says `actpass` until
    /// then.
    pub fn new(identity: Arc<DtlsIdentity>, now: Instant) -> WebRtcLeg {
        let local = WebRtcLocal {
            ice_ufrag: ice_chars(8),
            ice_pwd: ice_chars(24),
            fingerprint: identity.fingerprint.clone(),
            setup: Setup::ActPass,
            ssrc: rand::random(),
        };
        WebRtcLeg {
            identity,
            local,
            remote: None,
            role: None,
            dtls: None,
            client_config: None,
            early: VecDeque::new(),
            selected: None,
            nominated: false,
            validated: Vec::new(),
            state: State::Connecting,
            started: now,
            heard: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// What our SDP says of this leg (after [`WebRtcLeg::set_remote`], the role we took).
    pub fn local(&self) -> &WebRtcLocal {
        &self.local
    }

    /// The far end's ICE credentials, fingerprint and DTLS role, from its SDP (its answer to
    /// our offer, or its offer). The role is settled here: `active` makes us the server,
    /// `passive` the client, and an `actpass` offer is answered `passive` (server). A later
    /// SDP of the same far end (a re-INVITE) changes nothing here. Returns the role our SDP
    /// states from now on.
    pub fn set_remote(&mut self, now: Instant, remote: WebRtcRemote) -> Result<Setup, WebRtcError> {
        if self.remote.is_some() {
            return Ok(self.local.setup);
        }
        let (role, ours) = match remote.setup {
            Setup::Active | Setup::ActPass => (Role::Server, Setup::Passive),
            Setup::Passive => (Role::Client, Setup::Active),
        };
        if remote.setup == Setup::ActPass && self.local.setup == Setup::ActPass {
            // Two offers crossed: nothing in SIP makes that happen to one leg.
            return Err(WebRtcError::Role("actpass"));
        }
        if !matches!(
            remote.fingerprint.algorithm.as_str(),
            "sha-256" | "sha-384" | "sha-512"
        ) {
            return Err(WebRtcError::FingerprintHash(
                remote.fingerprint.algorithm.clone(),
            ));
        }
        self.local.setup = ours;
        self.remote = Some(remote);
        self.role = Some(role);
        // The browser starts ICE once it has answered: however long its operator let it
        // ring, the leg has its full time from here.
        self.started = now;
        let config = match self.identity.handshake_config(role == Role::Client) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                self.fail(e.clone());
                return Err(e);
            }
        };
        match role {
            Role::Server => {
                self.dtls = Some(Endpoint::new(
                    DTLS_PEER,
                    TransportProtocol::UDP,
                    Some(config),
                ));
                // Records that overtook the answer: the browser's ClientHello.
                while let Some(record) = self.early.pop_front() {
                    self.dtls_read(now, record);
                }
            }
            Role::Client => {
                self.dtls = Some(Endpoint::new(DTLS_PEER, TransportProtocol::UDP, None));
                self.client_config = Some(config);
                self.early.clear();
                self.start_client(now);
            }
        }
        Ok(ours)
    }

    /// As the DTLS client, send the ClientHello once ICE has found the browser (before, it
    /// would have nowhere to go).
    fn start_client(&mut self, now: Instant) {
        if self.selected.is_none() {
            return;
        }
        let (Some(ep), Some(config)) = (&mut self.dtls, self.client_config.take()) else {
            return;
        };
        if let Err(e) = ep.connect(now, DTLS_PEER, config, None) {
            self.fail(WebRtcError::Handshake(e.to_string()));
            return;
        }
        self.flush_dtls();
    }

    /// Where the browser is, once a check of its authenticated.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.selected
    }

    /// Whether media flows (the handshake completed and the keys are in place).
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected { .. })
    }

    /// Whether the leg failed (reported once by [`WebRtcEvent::Failed`]).
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed)
    }

    /// One datagram from `from`, `buf[..len]` (`buf` may be written: an SRTP packet is
    /// replaced by its plain RTP).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Datagram {
        if self.is_failed() || len == 0 || len > buf.len() {
            return Datagram::Dropped;
        }
        match buf[0] {
            0..=3 => self.on_stun(now, from, &buf[..len]),
            20..=63 => {
                if !self.validated.contains(&from) {
                    return Datagram::Dropped;
                }
                self.on_dtls(now, BytesMut::from(&buf[..len]));
                Datagram::Handled
            }
            128..=191 => {
                if Some(from) != self.selected {
                    return Datagram::Dropped;
                }
                self.on_srtp(now, buf, len)
            }
            _ => Datagram::Dropped,
        }
    }

    /// Protect a plain RTP packet for the browser: the SRTP packet, and where to send it.
    /// `None` before the keys are in place (or for a packet that is not RTP).
    pub fn protect(&mut self, rtp: &[u8]) -> Option<(BytesMut, SocketAddr)> {
        let to = self.selected?;
        let State::Connected { outbound, .. } = &mut self.state else {
            return None;
        };
        outbound.encrypt_rtp(rtp).ok().map(|p| (p, to))
    }

    /// Time passed: DTLS retransmissions, and the deadlines of the handshake and of consent.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Failed => return,
            State::Connecting => {
                if now.saturating_duration_since(self.started) >= CONNECT_WITHIN {
                    self.fail(WebRtcError::Timeout(CONNECT_WITHIN));
                    return;
                }
            }
            State::Connected { .. } => {
                let last = self.heard.unwrap_or(self.started);
                if now.saturating_duration_since(last) >= CONSENT_WITHIN {
                    self.fail(WebRtcError::ConsentExpired(CONSENT_WITHIN));
                    return;
                }
            }
        }
        if let Some(ep) = &mut self.dtls {
            let due = ep.poll_timeout(&DTLS_PEER).is_some_and(|t| t <= now);
            if due {
                if let Err(e) = ep.handle_timeout(DTLS_PEER, now) {
                    self.fail(WebRtcError::Handshake(e.to_string()));
                    return;
                }
            }
        }
        self.flush_dtls();
    }

    /// When [`WebRtcLeg::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Failed => None,
            State::Connecting => {
                let deadline = self.started + CONNECT_WITHIN;
                let dtls = self.dtls.as_ref().and_then(|e| e.poll_timeout(&DTLS_PEER));
                Some(dtls.map_or(deadline, |t| t.min(deadline)))
            }
            State::Connected { .. } => Some(self.heard.unwrap_or(self.started) + CONSENT_WITHIN),
        }
    }

    /// The next datagram to send: its bytes and where.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<WebRtcEvent> {
        self.events.pop_front()
    }

    /// Tell the browser we are done (DTLS `close_notify`), and stop.
    pub fn close(&mut self, now: Instant) {
        if let Some(ep) = &mut self.dtls {
            let _ = ep.close(now);
        }
        self.flush_dtls();
        self.state = State::Failed;
    }

    // ---- STUN ---------------------------------------------------------------------------

    fn on_stun(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> Datagram {
        let mut m = Message::new();
        if m.unmarshal_binary(data).is_err() || m.typ != BINDING_REQUEST {
            // Indications (keep-alives) and responses: nothing to answer.
            return Datagram::Dropped;
        }
        // USERNAME is "<our ufrag>:<theirs>" (RFC 8445 §7.2.2); the far end's may not be known
        // yet (its checks can overtake its SIP answer).
        let ours = match m.get(ATTR_USERNAME) {
            Ok(u) => u
                .split(|&b| b == b':')
                .next()
                .is_some_and(|u| u == self.local.ice_ufrag.as_bytes()),
            Err(_) => false,
        };
        if !ours {
            return Datagram::Dropped;
        }
        let identity = self.identity.clone();
        let crypto = identity.provider.crypto();
        if MessageIntegrity::check(&mut m, self.local.ice_pwd.as_bytes(), crypto).is_err() {
            return Datagram::Dropped;
        }
        let mut resp = Message::new();
        let setters: [Box<dyn Setter>; 5] = [
            Box::new(m.clone()),
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                self.local.ice_pwd.clone(),
                crypto,
            )),
            Box::new(FINGERPRINT),
        ];
        let built = resp.build(&setters);
        drop(setters);
        if built.is_err() {
            return Datagram::Dropped;
        }
        self.transmits.push_back((from, resp.raw));
        self.heard = Some(now);
        if !self.validated.contains(&from) {
            if self.validated.len() == MAX_VALIDATED {
                self.validated.remove(0);
            }
            self.validated.push(from);
        }
        let nominates = m.contains(ATTR_USE_CANDIDATE);
        if nominates || (!self.nominated && self.selected.is_none()) {
            self.selected = Some(from);
            self.nominated |= nominates;
        }
        self.start_client(now);
        Datagram::Handled
    }

    // ---- DTLS ---------------------------------------------------------------------------

    fn on_dtls(&mut self, now: Instant, record: BytesMut) {
        if self.dtls.is_none() {
            if self.early.len() < EARLY_DTLS {
                self.early.push_back(record);
            }
            return;
        }
        self.dtls_read(now, record);
    }

    fn dtls_read(&mut self, now: Instant, record: BytesMut) {
        let Some(ep) = &mut self.dtls else { return };
        let result = ep.read(now, DTLS_PEER, None, record);
        let mut complete = false;
        let mut closed = false;
        match result {
            Ok(events) => {
                for ev in events {
                    match ev {
                        EndpointEvent::HandshakeComplete => complete = true,
                        EndpointEvent::PeerClosed => closed = true,
                        _ => {}
                    }
                }
            }
            Err(e) => {
                // A record that does not fit the handshake (a stray, a duplicate) is dropped;
                // a handshake that cannot go on ends the leg at its deadline or with the
                // far end's alert.
                tracing::debug!(error = %e, "DTLS record not taken");
            }
        }
        self.flush_dtls();
        if complete {
            self.heard = Some(now);
            if let Err(e) = self.keys() {
                self.fail(e);
                return;
            }
        }
        if closed {
            self.fail(WebRtcError::Closed);
        }
    }

    /// The handshake completed: check the far end's certificate and derive the SRTP keys.
    fn keys(&mut self) -> Result<(), WebRtcError> {
        let (Some(ep), Some(remote)) = (&self.dtls, &self.remote) else {
            return Err(WebRtcError::Handshake("no association".to_owned()));
        };
        let state = ep
            .get_connection_state(DTLS_PEER)
            .ok_or_else(|| WebRtcError::Handshake("no association".to_owned()))?;
        let cert = state
            .peer_certificates
            .first()
            .ok_or(WebRtcError::Fingerprint)?;
        let digest = match remote.fingerprint.algorithm.as_str() {
            "sha-256" => Sha256::digest(cert).to_vec(),
            "sha-384" => sha2::Sha384::digest(cert).to_vec(),
            "sha-512" => sha2::Sha512::digest(cert).to_vec(),
            other => return Err(WebRtcError::FingerprintHash(other.to_owned())),
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            digest.as_slice(),
            remote.fingerprint.value.as_slice(),
        )) {
            return Err(WebRtcError::Fingerprint);
        }
        let (profile, name) = match state.srtp_protection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => {
                (ProtectionProfile::AeadAes128Gcm, "SRTP_AEAD_AES_128_GCM")
            }
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => (
                ProtectionProfile::Aes128CmHmacSha1_80,
                "SRTP_AES128_CM_HMAC_SHA1_80",
            ),
            other => return Err(WebRtcError::Srtp(format!("profile {other:?}"))),
        };
        let srtp = |e: rtc_shared::error::Error| WebRtcError::Srtp(e.to_string());
        let mut config = rtc_srtp::config::Config {
            profile,
            ..Default::default()
        };
        let material = state
            .export_keying_material(
                rtc_srtp::config::LABEL_EXTRACTOR_DTLS_SRTP,
                &[],
                config.keying_material_len(),
            )
            .map_err(srtp)?;
        config
            .set_session_keys_from_keying_material(material.as_ref(), state.is_client())
            .map_err(srtp)?;
        let crypto = self.identity.provider.crypto();
        let outbound = Context::new(
            &config.keys.local_master_key,
            &config.keys.local_master_salt,
            profile,
            None,
            None,
            crypto,
        )
        .map_err(srtp)?;
        let inbound = Context::new(
            &config.keys.remote_master_key,
            &config.keys.remote_master_salt,
            profile,
            Some(rtc_srtp::option::srtp_replay_protection(REPLAY_WINDOW)),
            Some(rtc_srtp::option::srtcp_replay_protection(REPLAY_WINDOW)),
            crypto,
        )
        .map_err(srtp)?;
        self.state = State::Connected {
            inbound: Box::new(inbound),
            outbound: Box::new(outbound),
        };
        if let Some(remote) = self.selected {
            self.events.push_back(WebRtcEvent::Connected {
                remote,
                profile: name,
            });
        }
        Ok(())
    }

    fn flush_dtls(&mut self) {
        let Some(ep) = &mut self.dtls else { return };
        while let Some(t) = ep.poll_transmit() {
            if let Some(to) = self.selected {
                self.transmits.push_back((to, t.message.to_vec()));
            }
        }
    }

    // ---- SRTP ---------------------------------------------------------------------------

    fn on_srtp(&mut self, now: Instant, buf: &mut [u8], len: usize) -> Datagram {
        let State::Connected { inbound, .. } = &mut self.state else {
            return Datagram::Dropped;
        };
        // RTCP (RFC 5761 §4: packet types 192–223 share the port): authenticated and dropped.
        if len >= 2 && (192..=223).contains(&buf[1]) {
            if inbound.decrypt_rtcp(&buf[..len]).is_ok() {
                self.heard = Some(now);
                return Datagram::Handled;
            }
            return Datagram::Dropped;
        }
        match inbound.decrypt_rtp(&buf[..len]) {
            Ok(plain) if plain.len() <= buf.len() => {
                buf[..plain.len()].copy_from_slice(&plain);
                self.heard = Some(now);
                Datagram::Media { len: plain.len() }
            }
            _ => Datagram::Dropped,
        }
    }

    fn fail(&mut self, e: WebRtcError) {
        if matches!(self.state, State::Failed) {
            return;
        }
        self.state = State::Failed;
        self.events.push_back(WebRtcEvent::Failed(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::RtpStream;
    use rtc_stun::attributes::ATTR_PRIORITY;
    use rtc_stun::message::Getter;
    use rtc_stun::textattrs::TextAttribute;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The far end of the tests: a browser built from webrtc-rs's DTLS and SRTP crates as a
    /// browser uses them (the full agent sends the checks; the DTLS client or server as its
    /// SDP says), independent of the code under test.
    struct Browser {
        at: SocketAddr,
        ufrag: String,
        pwd: String,
        identity: Arc<DtlsIdentity>,
        dtls: Endpoint,
        client: bool,
        keys: Option<(Context, Context)>,
        out: VecDeque<Vec<u8>>,
    }

    impl Browser {
        fn new(at: &str, client: bool) -> Browser {
            let identity = DtlsIdentity::generate().unwrap();
            let dtls = if client {
                Endpoint::new(DTLS_PEER, TransportProtocol::UDP, None)
            } else {
                let config = Arc::new(identity.handshake_config(false).unwrap());
                Endpoint::new(DTLS_PEER, TransportProtocol::UDP, Some(config))
            };
            Browser {
                at: addr(at),
                ufrag: "brws".to_owned(),
                pwd: "browserpasswordbrowserpw".to_owned(),
                identity,
                dtls,
                client,
                keys: None,
                out: VecDeque::new(),
            }
        }

        fn remote(&self, setup: Setup) -> WebRtcRemote {
            WebRtcRemote {
                ice_ufrag: self.ufrag.clone(),
                ice_pwd: self.pwd.clone(),
                fingerprint: self.identity.fingerprint().clone(),
                setup,
                mid: Some("0".to_owned()),
            }
        }

        /// A binding request to `leg`, with `pwd` as the leg's password.
        fn check(&self, leg: &WebRtcLocal, pwd: &str, nominate: bool) -> Vec<u8> {
            let crypto = self.identity.provider.crypto();
            let mut m = Message::new();
            let user =
                TextAttribute::new(ATTR_USERNAME, format!("{}:{}", leg.ice_ufrag, self.ufrag));
            let mut setters: Vec<Box<dyn Setter>> = vec![
                Box::new(BINDING_REQUEST),
                Box::new(rtc_stun::message::TransactionId::new()),
                Box::new(user),
            ];
            if nominate {
                setters.push(Box::new(UseCandidate));
            }
            setters.push(Box::new(
                MessageIntegrity::new_short_term_integrity_with_provider(pwd.to_owned(), crypto),
            ));
            setters.push(Box::new(FINGERPRINT));
            m.build(&setters).unwrap();
            m.raw
        }

        fn start_dtls(&mut self, now: Instant) {
            if self.client {
                let config = Arc::new(self.identity.handshake_config(true).unwrap());
                self.dtls.connect(now, DTLS_PEER, config, None).unwrap();
            }
            self.flush();
        }

        fn flush(&mut self) {
            while let Some(t) = self.dtls.poll_transmit() {
                self.out.push_back(t.message.to_vec());
            }
        }

        fn read(&mut self, now: Instant, data: &[u8]) {
            if !(20..=63).contains(&data[0]) {
                return;
            }
            let events = self.dtls.read(now, DTLS_PEER, None, BytesMut::from(data));
            for ev in events.unwrap_or_default() {
                if matches!(ev, EndpointEvent::HandshakeComplete) {
                    self.derive();
                }
            }
            self.flush();
        }

        fn derive(&mut self) {
            let state = self.dtls.get_connection_state(DTLS_PEER).unwrap();
            let profile = match state.srtp_protection_profile() {
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
                _ => ProtectionProfile::Aes128CmHmacSha1_80,
            };
            let mut config = rtc_srtp::config::Config {
                profile,
                ..Default::default()
            };
            let km = state
                .export_keying_material(
                    rtc_srtp::config::LABEL_EXTRACTOR_DTLS_SRTP,
                    &[],
                    config.keying_material_len(),
                )
                .unwrap();
            config
                .set_session_keys_from_keying_material(km.as_ref(), state.is_client())
                .unwrap();
            let crypto = self.identity.provider.crypto();
            let k = &config.keys;
            let out = Context::new(
                &k.local_master_key,
                &k.local_master_salt,
                profile,
                None,
                None,
                crypto,
            )
            .unwrap();
            let inb = Context::new(
                &k.remote_master_key,
                &k.remote_master_salt,
                profile,
                None,
                None,
                crypto,
            )
            .unwrap();
            self.keys = Some((out, inb));
        }
    }

    /// `USE-CANDIDATE` (no value).
    struct UseCandidate;
    impl Setter for UseCandidate {
        fn add_to(&self, m: &mut Message) -> rtc_shared::error::Result<()> {
            m.add(ATTR_USE_CANDIDATE, &[]);
            Ok(())
        }
    }

    /// Exchange everything both sides have to send until nothing moves.
    fn pump(now: Instant, leg: &mut WebRtcLeg, b: &mut Browser) {
        for _ in 0..64 {
            let mut moved = false;
            while let Some(d) = b.out.pop_front() {
                moved = true;
                let mut buf = d.clone();
                let n = buf.len();
                leg.handle_datagram(now, b.at, &mut buf, n);
            }
            while let Some((to, d)) = leg.poll_transmit() {
                moved = true;
                assert_eq!(to, b.at, "everything goes to the browser's checked address");
                b.read(now, &d);
            }
            if !moved {
                return;
            }
        }
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut s = RtpStream::with_origin(42, seq, 160 * seq as u32);
        let mut out = [0u8; 200];
        let n = s.write(0, &[0x55; 160], 160, &mut out);
        out[..n].to_vec()
    }

    /// ICE, then the handshake, then SRTP both ways, for a browser in `browser_setup`.
    fn connect(browser_setup: Setup) -> (WebRtcLeg, Browser, Instant) {
        let t0 = Instant::now();
        let identity = DtlsIdentity::generate().unwrap();
        let mut leg = WebRtcLeg::new(identity, t0);
        assert_eq!(leg.local().setup, Setup::ActPass);
        let mut b = Browser::new("192.0.2.10:50000", browser_setup == Setup::Active);
        let ours = leg.set_remote(t0, b.remote(browser_setup)).unwrap();
        let expected = if browser_setup == Setup::Passive {
            Setup::Active
        } else {
            Setup::Passive
        };
        assert_eq!(ours, expected);
        // The browser checks our candidate and nominates it.
        let check = b.check(leg.local(), &leg.local().ice_pwd.clone(), true);
        let mut buf = check.clone();
        let n = buf.len();
        assert_eq!(
            leg.handle_datagram(t0, b.at, &mut buf, n),
            Datagram::Handled
        );
        let (to, resp) = leg.poll_transmit().expect("a binding response");
        assert_eq!(to, b.at);
        let mut r = Message::new();
        r.unmarshal_binary(&resp).unwrap();
        assert_eq!(r.typ, BINDING_SUCCESS);
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&r).unwrap();
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), b.at);
        MessageIntegrity::check(
            &mut r,
            leg.local().ice_pwd.as_bytes(),
            b.identity.provider.crypto(),
        )
        .expect("the response authenticates with our password");
        assert_eq!(leg.remote_addr(), Some(b.at));
        // Then DTLS, whoever starts it.
        b.start_dtls(t0);
        pump(t0, &mut leg, &mut b);
        assert!(leg.is_connected(), "the handshake completed");
        assert!(b.keys.is_some());
        match leg.poll_event() {
            Some(WebRtcEvent::Connected { remote, .. }) => assert_eq!(remote, b.at),
            other => panic!("{other:?}"),
        }
        (leg, b, t0)
    }

    fn media_both_ways(leg: &mut WebRtcLeg, b: &mut Browser, t: Instant) {
        // Browser → us: SRTP in, the plain packet out.
        let plain = rtp(7);
        let (bout, _) = b.keys.as_mut().unwrap();
        let srtp = bout.encrypt_rtp(&plain).unwrap();
        assert_ne!(&srtp[..], &plain[..]);
        let mut buf = [0u8; 2048];
        buf[..srtp.len()].copy_from_slice(&srtp);
        assert_eq!(
            leg.handle_datagram(t, b.at, &mut buf, srtp.len()),
            Datagram::Media { len: plain.len() }
        );
        assert_eq!(&buf[..plain.len()], &plain[..]);
        // The same packet again is a replay.
        buf[..srtp.len()].copy_from_slice(&srtp);
        assert_eq!(
            leg.handle_datagram(t, b.at, &mut buf, srtp.len()),
            Datagram::Dropped
        );
        // From anywhere else: dropped before any crypto.
        buf[..srtp.len()].copy_from_slice(&srtp);
        assert_eq!(
            leg.handle_datagram(t, addr("192.0.2.66:1"), &mut buf, srtp.len()),
            Datagram::Dropped
        );
        // Us → browser.
        let (p, to) = leg.protect(&rtp(9)).expect("protected");
        assert_eq!(to, b.at);
        let (_, bin) = b.keys.as_mut().unwrap();
        assert_eq!(&bin.decrypt_rtp(&p).unwrap()[..], &rtp(9)[..]);
    }

    #[test]
    fn a_browser_answering_active_makes_us_the_dtls_server_and_media_flows_both_ways() {
        let (mut leg, mut b, t) = connect(Setup::Active);
        media_both_ways(&mut leg, &mut b, t);
    }

    #[test]
    fn a_browser_answering_passive_makes_us_the_dtls_client_and_media_flows_both_ways() {
        let (mut leg, mut b, t) = connect(Setup::Passive);
        media_both_ways(&mut leg, &mut b, t);
    }

    #[test]
    fn a_check_with_the_wrong_password_or_ufrag_is_not_answered() {
        let t = Instant::now();
        let mut leg = WebRtcLeg::new(DtlsIdentity::generate().unwrap(), t);
        let b = Browser::new("192.0.2.10:50000", true);
        let mut bad = b.check(leg.local(), "wrongpasswordwrongpassword", true);
        let n = bad.len();
        assert_eq!(leg.handle_datagram(t, b.at, &mut bad, n), Datagram::Dropped);
        let mut other = leg.local().clone();
        other.ice_ufrag = "nope".to_owned();
        let mut bad = b.check(&other, &leg.local().ice_pwd.clone(), true);
        let n = bad.len();
        assert_eq!(leg.handle_datagram(t, b.at, &mut bad, n), Datagram::Dropped);
        assert!(leg.poll_transmit().is_none());
        assert_eq!(leg.remote_addr(), None);
        // DTLS from an address no check came from is dropped too.
        let mut hello = vec![22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let n = hello.len();
        assert_eq!(
            leg.handle_datagram(t, b.at, &mut hello, n),
            Datagram::Dropped
        );
    }

    #[test]
    fn the_nominated_pair_wins_over_the_first_checked() {
        let t = Instant::now();
        let mut leg = WebRtcLeg::new(DtlsIdentity::generate().unwrap(), t);
        let b = Browser::new("192.0.2.10:50000", true);
        let pwd = leg.local().ice_pwd.clone();
        let mut first = b.check(leg.local(), &pwd, false);
        let n = first.len();
        leg.handle_datagram(t, addr("192.0.2.10:50001"), &mut first, n);
        assert_eq!(leg.remote_addr(), Some(addr("192.0.2.10:50001")));
        let mut nominated = b.check(leg.local(), &pwd, true);
        let n = nominated.len();
        leg.handle_datagram(t, b.at, &mut nominated, n);
        assert_eq!(leg.remote_addr(), Some(b.at));
        // A later plain check from elsewhere does not move a nominated pair.
        let mut late = b.check(leg.local(), &pwd, false);
        let n = late.len();
        leg.handle_datagram(t, addr("192.0.2.10:50002"), &mut late, n);
        assert_eq!(leg.remote_addr(), Some(b.at));
        // PRIORITY is not required of a check to a lite agent; its absence is fine above.
        let _ = ATTR_PRIORITY;
    }

    #[test]
    fn a_certificate_that_does_not_match_the_sdp_fingerprint_fails_the_leg() {
        let t = Instant::now();
        let mut leg = WebRtcLeg::new(DtlsIdentity::generate().unwrap(), t);
        let mut b = Browser::new("192.0.2.10:50000", true);
        let mut remote = b.remote(Setup::Active);
        remote.fingerprint = DtlsIdentity::generate().unwrap().fingerprint().clone();
        leg.set_remote(t, remote).unwrap();
        let pwd = leg.local().ice_pwd.clone();
        let mut c = b.check(leg.local(), &pwd, true);
        let n = c.len();
        leg.handle_datagram(t, b.at, &mut c, n);
        let _ = leg.poll_transmit();
        b.start_dtls(t);
        pump(t, &mut leg, &mut b);
        assert!(!leg.is_connected());
        assert_eq!(
            leg.poll_event(),
            Some(WebRtcEvent::Failed(WebRtcError::Fingerprint))
        );
        assert!(leg.protect(&rtp(1)).is_none());
    }

    #[test]
    fn a_browser_that_never_connects_fails_the_leg_at_its_deadline_once() {
        let t = Instant::now();
        let mut leg = WebRtcLeg::new(DtlsIdentity::generate().unwrap(), t);
        let b = Browser::new("192.0.2.10:50000", true);
        leg.set_remote(t, b.remote(Setup::Active)).unwrap();
        assert_eq!(leg.poll_timeout(), Some(t + CONNECT_WITHIN));
        leg.handle_timeout(t + CONNECT_WITHIN - Duration::from_millis(1));
        assert_eq!(leg.poll_event(), None);
        leg.handle_timeout(t + CONNECT_WITHIN);
        assert_eq!(
            leg.poll_event(),
            Some(WebRtcEvent::Failed(WebRtcError::Timeout(CONNECT_WITHIN)))
        );
        leg.handle_timeout(t + CONNECT_WITHIN * 2);
        assert_eq!(leg.poll_event(), None);
        assert_eq!(leg.poll_timeout(), None);
    }

    #[test]
    fn a_browser_answering_after_a_long_ring_gets_its_full_time_to_connect() {
        let t = Instant::now();
        let mut leg = WebRtcLeg::new(DtlsIdentity::generate().unwrap(), t);
        let b = Browser::new("192.0.2.10:50000", true);
        // The operator let it ring for longer than the connect deadline.
        let answered = t + CONNECT_WITHIN + Duration::from_secs(5);
        leg.set_remote(answered, b.remote(Setup::Active)).unwrap();
        assert_eq!(leg.poll_timeout(), Some(answered + CONNECT_WITHIN));
        leg.handle_timeout(answered + Duration::from_millis(20));
        assert_eq!(leg.poll_event(), None);
        assert!(!leg.is_failed());
        leg.handle_timeout(answered + CONNECT_WITHIN);
        assert_eq!(
            leg.poll_event(),
            Some(WebRtcEvent::Failed(WebRtcError::Timeout(CONNECT_WITHIN)))
        );
    }

    #[test]
    fn a_connected_browser_that_goes_quiet_loses_consent_and_a_check_keeps_it() {
        let (mut leg, b, t) = connect(Setup::Active);
        let pwd = leg.local().ice_pwd.clone();
        let later = t + CONSENT_WITHIN - Duration::from_secs(1);
        let mut c = b.check(leg.local(), &pwd, false);
        let n = c.len();
        assert_eq!(
            leg.handle_datagram(later, b.at, &mut c, n),
            Datagram::Handled
        );
        leg.handle_timeout(t + CONSENT_WITHIN + Duration::from_secs(1));
        assert_eq!(leg.poll_event(), None, "the check renewed consent");
        leg.handle_timeout(later + CONSENT_WITHIN);
        assert_eq!(
            leg.poll_event(),
            Some(WebRtcEvent::Failed(WebRtcError::ConsentExpired(
                CONSENT_WITHIN
            )))
        );
    }

    #[test]
    fn a_client_hello_that_overtakes_the_answer_is_kept_until_the_role_is_known() {
        let t = Instant::now();
        let mut leg = WebRtcLeg::new(DtlsIdentity::generate().unwrap(), t);
        let mut b = Browser::new("192.0.2.10:50000", true);
        let pwd = leg.local().ice_pwd.clone();
        let mut c = b.check(leg.local(), &pwd, true);
        let n = c.len();
        leg.handle_datagram(t, b.at, &mut c, n);
        let _ = leg.poll_transmit();
        b.start_dtls(t);
        let hello = b.out.pop_front().unwrap();
        let mut buf = hello.clone();
        let n = buf.len();
        assert_eq!(leg.handle_datagram(t, b.at, &mut buf, n), Datagram::Handled);
        assert!(
            leg.poll_transmit().is_none(),
            "no role yet: nothing to answer"
        );
        leg.set_remote(t, b.remote(Setup::Active)).unwrap();
        pump(t, &mut leg, &mut b);
        assert!(leg.is_connected());
    }

    #[test]
    fn garbage_of_every_first_byte_is_dropped_without_panic() {
        let (mut leg, b, t) = connect(Setup::Active);
        for first in 0..=255u8 {
            for len in [1usize, 2, 12, 13, 40] {
                let mut buf = vec![first; len];
                let r = leg.handle_datagram(t, b.at, &mut buf, len);
                assert_ne!(r, Datagram::Media { len }, "first byte {first}");
            }
        }
        assert!(leg.is_connected());
    }
}
