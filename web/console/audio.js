// The call's audio in the operator's browser: JsSIP (served by ivr311 at
// /console/assets/jssip.min.js) registers the agent over SIP over WebSocket (RFC 7118) at /sip
// on this server, and answers the server's INVITE for the caller offered to this agent with
// WebRTC (DTLS-SRTP, G.711). It fills the hooks console.js calls:
//   window.console311.audio = { start, stop, answer, hangup, mute, hold, sendDtmf, level, status }
// and shows what goes wrong (no microphone, no common codec, the WebSocket lost) through
// window.console311.ui.say. Plain JavaScript, no build step.
//
// The supervisor's wallboard uses it too: `start({..., onlyExpected: true})` declines (486)
// every INVITE but the one the page asked for with `expect(match, withinMs, { muted })`, which
// is answered as soon as it arrives (`match(request)`: e.g. its X-311-Monitor-Token header);
// `mute`, `sendDtmf` and `hangup` then act on that call.
//
// The caller is heard through an <audio> element, and through a WebAudio AnalyserNode that
// `level()` reads: { rms, frequency } of what the caller sends (the page's own meter, and what
// the browser tests read), and `spectrum([hz...])` the level in dB at each of those frequencies.
"use strict";

(function () {
  window.console311 = window.console311 || {};
  const ui = () => window.console311.ui || { say() {}, t: (k) => k };
  const say = (key, bad, extra) => ui().say(ui().t(key) + (extra ? ` ${extra}` : ""), bad);

  // The microphone's processing (echo cancellation, noise suppression, automatic gain):
  // on unless this browser was set otherwise (`localStorage["console311.audio.processing"] =
  // "off"`, for headsets that do their own; the browser tests use it so that their test tone
  // reaches the caller as it is).
  function constraints() {
    const on = localStorage.getItem("console311.audio.processing") !== "off";
    return {
      audio: { echoCancellation: on, noiseSuppression: on, autoGainControl: on },
      video: false,
    };
  }

  const ANSWER_AHEAD_MS = 10000;

  const a = {
    ua: null,
    // The call the server offered (a JsSIP RTCSession) and the offer's call-id it is for.
    session: null,
    // Answer the INVITE for this call-id ("any": the offer named none) as soon as it arrives
    // (Answer was clicked first), if it arrives within ANSWER_AHEAD_MS of the click.
    answerFor: null,
    answerAt: 0,
    registered: false,
    connected: false,
    // WebAudio: one context for the page, the analyser on the caller's stream.
    ctx: null,
    analyser: null,
    source: null,
    buf: null,
    el: null,
    failure: null,
    // The INVITE the page asked for (`expect`): { match, until, muted }.
    expected: null,
    onlyExpected: false,
    // INVITEs declined because this page did not ask for them (`onlyExpected`).
    declined: 0,
    // Told of the call's changes ("ringing", "up", "ended"): the page's own display.
    onChange: null,
  };

  function status() {
    return {
      connected: a.connected,
      registered: a.registered,
      call: a.session ? (a.session.isEstablished() ? "up" : a.session.isEnded() ? "ended" : "ringing") : null,
      failure: a.failure,
      declined: a.declined,
    };
  }

  function showStatus() {
    const el = document.getElementById("audio-status");
    if (!el) return;
    el.hidden = !a.ua;
    let key = "audio_off";
    if (a.registered) key = "audio_ready";
    else if (a.connected) key = "audio_connecting";
    else if (a.ua) key = "audio_lost";
    el.textContent = ui().t(key);
    el.className = `audio-status a-${key}`;
  }

  function audioElement() {
    if (!a.el) {
      a.el = document.getElementById("remote-audio") || document.createElement("audio");
      a.el.autoplay = true;
    }
    return a.el;
  }

  function audioContext() {
    if (!a.ctx) {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      if (Ctx) a.ctx = new Ctx();
    }
    if (a.ctx && a.ctx.state === "suspended") a.ctx.resume().catch(() => {});
    return a.ctx;
  }

  // The caller's stream: to the <audio> element (Chromium plays remote WebRTC audio only
  // through a media element) and to the analyser.
  function play(stream) {
    const el = audioElement();
    el.srcObject = stream;
    el.play().catch((e) => say("audio_blocked", true, String(e)));
    const ctx = audioContext();
    if (!ctx) return;
    if (a.source) a.source.disconnect();
    a.source = ctx.createMediaStreamSource(stream);
    a.analyser = ctx.createAnalyser();
    a.analyser.fftSize = 2048;
    a.analyser.smoothingTimeConstant = 0.2;
    a.buf = new Float32Array(a.analyser.fftSize);
    a.source.connect(a.analyser);
  }

  // What the caller sounds like now: RMS (0..1) and the strongest frequency in Hz.
  function level() {
    if (!a.analyser) return { rms: 0, frequency: 0 };
    a.analyser.getFloatTimeDomainData(a.buf);
    let sum = 0;
    for (const x of a.buf) sum += x * x;
    const rms = Math.sqrt(sum / a.buf.length);
    const bins = new Float32Array(a.analyser.frequencyBinCount);
    a.analyser.getFloatFrequencyData(bins);
    let best = 1;
    for (let i = 2; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
    const frequency = (best * a.ctx.sampleRate) / a.analyser.fftSize;
    return { rms, frequency: Math.round(frequency) };
  }

  // The level (dB, as the analyser reads it) at each of `freqs` (Hz) in what is heard now.
  function spectrum(freqs) {
    if (!a.analyser) return freqs.map(() => null);
    const bins = new Float32Array(a.analyser.frequencyBinCount);
    a.analyser.getFloatFrequencyData(bins);
    const hz = a.ctx.sampleRate / a.analyser.fftSize;
    return freqs.map((f) => {
      const i = Math.round(f / hz);
      return Math.max(bins[i - 1], bins[i], bins[i + 1]);
    });
  }

  const changed = (what) => { if (a.onChange) a.onChange(what); };

  // G.711 is what the server speaks to browsers (RFC 3551 static types 0 and 8).
  function hasG711(sdp) {
    const m = /^m=audio \d+ [^ ]+ ([0-9 ]+)/m.exec(sdp || "");
    return !!m && m[1].split(" ").some((pt) => pt === "0" || pt === "8");
  }

  function failed(cause) {
    a.failure = cause;
    const C = JsSIP.C.causes;
    if (cause === C.USER_DENIED_MEDIA_ACCESS) say("audio_no_microphone", true);
    else if (cause === C.INCOMPATIBLE_SDP || cause === C.BAD_MEDIA_DESCRIPTION || cause === "codec") say("audio_no_codec", true);
    else if (cause === C.WEBRTC_ERROR) say("audio_webrtc", true, cause);
    else say("audio_call_failed", true, cause);
  }

  function onSession(e) {
    if (e.originator !== "remote") {
      // This page places no calls; a softphone's own INVITEs are for a SIP phone.
      return;
    }
    const s = e.session;
    const x = a.expected;
    const expected = !!x && Date.now() < x.until && x.match(e.request);
    if (a.onlyExpected && !expected) {
      // This page takes only the calls it asked for.
      a.declined += 1;
      s.terminate({ status_code: 486, reason_phrase: "Busy Here" });
      return;
    }
    if (a.session && !a.session.isEnded()) {
      // One call at a time: the server offers one.
      s.terminate({ status_code: 486, reason_phrase: "Busy Here" });
      return;
    }
    a.session = s;
    a.failure = null;
    s.callId = e.request.getHeader("X-311-Call-ID");
    s.on("sdp", (ev) => {
      if (ev.originator === "remote" && !hasG711(ev.sdp)) failed("codec");
      if (ev.originator === "local" && ev.type === "answer" && !hasG711(ev.sdp)) failed("codec");
    });
    s.on("peerconnection", (ev) => {
      const pc = ev.peerconnection;
      pc.addEventListener("track", (t) => play(t.streams[0] || new MediaStream([t.track])));
      pc.addEventListener("connectionstatechange", () => {
        if (pc.connectionState === "failed") failed(JsSIP.C.causes.WEBRTC_ERROR);
      });
    });
    s.on("failed", (ev) => {
      if (ev.originator === "local" || ev.cause !== JsSIP.C.causes.CANCELED) failed(ev.cause);
      if (a.session === s) { a.session = null; changed("ended"); }
    });
    s.on("ended", () => { if (a.session === s) { a.session = null; changed("ended"); } });
    s.on("confirmed", () => changed("up"));
    if (expected) {
      a.expected = null;
      // Muted from the start when asked (a supervisor who only listens).
      if (x.muted) s.on("accepted", () => s.mute({ audio: true }));
      changed("ringing");
      answerNow(s);
      return;
    }
    const pending = a.answerFor && Date.now() - a.answerAt < ANSWER_AHEAD_MS;
    if (pending && (a.answerFor === "any" || !s.callId || a.answerFor === s.callId)) {
      a.answerFor = null;
      answerNow(s);
    }
  }

  function answerNow(s) {
    audioContext(); // created in the click's user gesture
    try {
      s.answer({ mediaConstraints: constraints(), pcConfig: { iceServers: [] } });
    } catch (e) {
      failed(String(e));
    }
  }

  function start({ user, password, websocketPath, onlyExpected, onChange, userAgent }) {
    stop();
    a.onlyExpected = !!onlyExpected;
    a.onChange = onChange || null;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new JsSIP.WebSocketInterface(`${scheme}://${location.host}${websocketPath || "/sip"}`);
    const ua = new JsSIP.UA({
      sockets: [socket],
      uri: `sip:${user}@${location.hostname}`,
      password,
      register: true,
      session_timers: false,
      user_agent: userAgent || "ivr311-console",
    });
    a.ua = ua;
    ua.on("connected", () => { a.connected = true; showStatus(); });
    ua.on("disconnected", () => {
      const was = a.connected || a.registered;
      a.connected = false; a.registered = false; showStatus();
      if (was && a.ua === ua) say("audio_lost", true);
    });
    ua.on("registered", () => { a.registered = true; showStatus(); });
    ua.on("unregistered", () => { a.registered = false; showStatus(); });
    ua.on("registrationFailed", (e) => { a.registered = false; showStatus(); say("audio_register_failed", true, e.cause); });
    ua.on("newRTCSession", onSession);
    ua.start();
    showStatus();
  }

  function stop() {
    if (!a.ua) return;
    const ua = a.ua;
    a.ua = null; a.session = null; a.registered = false; a.connected = false;
    ua.stop();
    if (a.source) { a.source.disconnect(); a.source = null; }
    a.analyser = null;
    if (a.el) a.el.srcObject = null;
    showStatus();
  }

  // Answer in the banner answers the server's INVITE for that caller (the same click); if it
  // has not reached the browser yet, it is answered when it does.
  function answer(offer) {
    if (!a.ua) return false;
    const s = a.session;
    const want = offer && offer.call_id;
    if (s && !s.isEnded() && !s.isEstablished() && (!want || !s.callId || s.callId === want)) {
      answerNow(s);
    } else {
      a.answerFor = want || "any";
      a.answerAt = Date.now();
      audioContext();
    }
    return true;
  }

  // Answer the next INVITE that `match(request)` accepts, if it arrives within `withinMs`,
  // with the microphone muted if `muted`. Call it from the click (the audio context starts in
  // the user's gesture) and before the request that makes the server call.
  function expect(match, withinMs, { muted } = {}) {
    a.expected = { match, until: Date.now() + withinMs, muted: !!muted };
    audioContext();
  }

  const live = () => (a.session && a.session.isEstablished() ? a.session : null);

  window.console311.audio = {
    start,
    stop,
    answer,
    hangup() { const s = a.session; if (s && !s.isEnded()) s.terminate(); },
    mute(on) {
      const s = live(); if (!s) return false;
      if (on) s.mute({ audio: true }); else s.unmute({ audio: true });
      return true;
    },
    hold(on) {
      const s = live(); if (!s) return false;
      return on ? s.hold() : s.unhold();
    },
    // RFC 4733 events in the media stream (not SIP INFO): what the server and the far end act on.
    sendDtmf(key) {
      const s = live(); if (!s) return false;
      s.sendDTMF(key, { transportType: "RFC2833", duration: 160, interToneGap: 80 });
      return true;
    },
    expect,
    level,
    spectrum,
    status,
    active: () => !!a.ua,
  };
})();
