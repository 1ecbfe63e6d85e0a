// The 311 operator console. Plain JavaScript, no build step, nothing fetched from elsewhere.
//
// It talks to the server's console API (README: "Operator console"): log-in, the session,
// server-sent events at /console/events, states, decline, hang-up and tickets. The call's
// audio in the browser (SIP over WebSocket, WebRTC) is audio.js, through
// `window.console311.audio`:
//   start({user, password, websocketPath}), stop(), active(), answer(offer), mute(on),
//   hold(on), sendDtmf(key)
// started at log-in when the operator ticks "Audio in this browser". Without it (an operator
// on a desk phone), the page says to use the phone. audio.js shows its messages through
// `window.console311.ui` ({say, t}).
"use strict";

(function () {
  const T = {
    en: {
      title: "311 Operator console", agent: "Agent", ready: "Ready", not_ready: "Not ready",
      wrap_end: "End wrap-up", wrap_extend: "+1 min", logout: "Log out", login_title: "Log in",
      agent_id: "Agent id", password: "Password", login: "Log in", incoming: "Incoming call",
      answer: "Answer", decline: "Decline", caller: "Caller", no_caller: "No call right now.",
      number: "Number", language: "Language", menu_path: "Menu path", queue: "Queue",
      waited: "Waited", callback: "Call-back", history: "Earlier requests (90 days)",
      h_number: "Number", h_service: "Service", h_status: "Status", h_date: "Date",
      call: "Call", mute: "Mute", hold: "Hold", hangup: "Hang up", transfer: "Transfer",
      transfer_911: "Transfer to 911", transfer_to: "Destination", ticket: "Service request",
      service: "Service", address: "Address", zip: "ZIP code", description: "Description",
      save: "Save request", read_back: "Read this number to the caller:",
      open_request: "Open a request", request_number: "Request number", open: "Open",
      status: "Status", notes: "Notes", update: "Update", open_status: "open",
      closed_status: "closed", yes: "yes", no: "no", seconds: "s", none: "None",
      st_logged_out: "Logged out", st_available: "Ready", st_ringing: "Ringing",
      st_on_call: "On a call", st_wrap_up: "Wrap-up", st_no_answer_pause: "Missed call pause",
      st_paused: "Not ready", st_unregistered: "phone not registered",
      r_break: "Break", r_lunch: "Lunch", r_training: "Training", r_after_call_work: "After-call work",
      use_phone: "Use your phone for this.", answer_phone: "Pick up your phone to answer.",
      bad_login: "Wrong agent id or password.", too_many: "Too many failed log-ins. Try again later.",
      session_over: "Your session has ended. Log in again.", saved: "Request saved.",
      updated: "Request updated.", not_found: "No such request.", failed: "That did not work:",
      call_ended: "The call has ended.", offline: "Connection lost; reconnecting…",
      transferring: "Transferring…", choose_service: "Choose a service…",
      browser_audio: "Audio in this browser (headset)", audio_ready: "Browser audio ready",
      audio_connecting: "Browser audio connecting…", audio_lost: "Browser audio lost: reconnecting…",
      audio_off: "", audio_no_microphone: "The browser may not use the microphone: allow it for this page, then answer again.",
      audio_no_codec: "This browser offers no audio codec the server speaks (G.711 PCMU/PCMA).",
      audio_webrtc: "The browser's audio connection failed:", audio_call_failed: "The call's audio failed:",
      audio_register_failed: "The browser's phone could not log in:", audio_blocked: "The browser did not play the call:",
    },
    es: {
      title: "Consola de operador 311", agent: "Agente", ready: "Disponible", not_ready: "No disponible",
      wrap_end: "Terminar cierre", wrap_extend: "+1 min", logout: "Cerrar sesión", login_title: "Iniciar sesión",
      agent_id: "Id de agente", password: "Contraseña", login: "Entrar", incoming: "Llamada entrante",
      answer: "Contestar", decline: "Rechazar", caller: "Persona que llama", no_caller: "No hay llamada ahora.",
      number: "Número", language: "Idioma", menu_path: "Ruta del menú", queue: "Cola",
      waited: "Esperó", callback: "Devolución de llamada", history: "Solicitudes anteriores (90 días)",
      h_number: "Número", h_service: "Servicio", h_status: "Estado", h_date: "Fecha",
      call: "Llamada", mute: "Silenciar", hold: "En espera", hangup: "Colgar", transfer: "Transferir",
      transfer_911: "Transferir al 911", transfer_to: "Destino", ticket: "Solicitud de servicio",
      service: "Servicio", address: "Dirección", zip: "Código postal", description: "Descripción",
      save: "Guardar solicitud", read_back: "Lea este número a la persona:",
      open_request: "Abrir una solicitud", request_number: "Número de solicitud", open: "Abrir",
      status: "Estado", notes: "Notas", update: "Actualizar", open_status: "abierta",
      closed_status: "cerrada", yes: "sí", no: "no", seconds: "s", none: "Ninguna",
      st_logged_out: "Fuera de sesión", st_available: "Disponible", st_ringing: "Sonando",
      st_on_call: "En llamada", st_wrap_up: "Cierre de llamada", st_no_answer_pause: "Pausa por llamada perdida",
      st_paused: "No disponible", st_unregistered: "teléfono no registrado",
      r_break: "Descanso", r_lunch: "Almuerzo", r_training: "Capacitación", r_after_call_work: "Trabajo posterior",
      use_phone: "Use su teléfono para esto.", answer_phone: "Levante su teléfono para contestar.",
      bad_login: "Id de agente o contraseña incorrectos.", too_many: "Demasiados intentos fallidos. Intente más tarde.",
      session_over: "Su sesión terminó. Inicie sesión de nuevo.", saved: "Solicitud guardada.",
      updated: "Solicitud actualizada.", not_found: "No existe esa solicitud.", failed: "No funcionó:",
      call_ended: "La llamada terminó.", offline: "Conexión perdida; reconectando…",
      transferring: "Transfiriendo…", choose_service: "Elija un servicio…",
      browser_audio: "Audio en este navegador (auriculares)", audio_ready: "Audio del navegador listo",
      audio_connecting: "Conectando el audio del navegador…", audio_lost: "Audio del navegador perdido: reconectando…",
      audio_off: "", audio_no_microphone: "El navegador no puede usar el micrófono: permítalo para esta página y conteste de nuevo.",
      audio_no_codec: "Este navegador no ofrece ningún códec de audio que el servidor use (G.711 PCMU/PCMA).",
      audio_webrtc: "Falló la conexión de audio del navegador:", audio_call_failed: "Falló el audio de la llamada:",
      audio_register_failed: "El teléfono del navegador no pudo iniciar sesión:", audio_blocked: "El navegador no reprodujo la llamada:",
    },
  };

  const $ = (id) => document.getElementById(id);
  let lang = localStorage.getItem("console311.lang") === "es" ? "es" : "en";
  const t = (k) => (T[lang] && T[lang][k]) || T.en[k] || k;

  const st = { csrf: null, me: null, state: null, offer: null, events: null, services: [], password: null };

  // Hooks for the browser's SIP/WebRTC audio (filled in by the audio module when present).
  window.console311 = window.console311 || {};
  window.console311.audio = window.console311.audio || null;
  const audio = () => window.console311.audio;
  // Browser audio hooks that are running (the operator chose audio in this browser).
  const browserAudio = () => (audio() && audio().active && audio().active() ? audio() : null);

  function applyLang() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
    document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
    $("lang-en").setAttribute("aria-pressed", String(lang === "en"));
    $("lang-es").setAttribute("aria-pressed", String(lang === "es"));
    fillReasons();
    if (st.services.length) { const keep = $("t-service").value; fillServices(); $("t-service").value = keep; }
    showState();
    showOffer();
  }

  function say(msg, bad) {
    const m = $("message");
    m.textContent = msg || "";
    m.classList.toggle("error", !!bad);
  }

  async function api(method, path, body) {
    const headers = {};
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      if (st.csrf) headers["X-CSRF-Token"] = st.csrf;
    }
    const r = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: method === "GET" ? undefined : JSON.stringify(body || {}),
    });
    let data = null;
    try { data = await r.json(); } catch (_) { data = null; }
    if (r.status === 401 && st.me) { loggedOut(t("session_over")); }
    return { status: r.status, data };
  }

  // ---- log-in -------------------------------------------------------------------------

  function loggedOut(msg) {
    if (st.events) { st.events.close(); st.events = null; }
    stopRing();
    st.csrf = null; st.me = null; st.offer = null; st.state = null;
    if (audio() && audio().stop) audio().stop();
    $("app").hidden = true; $("statebar").hidden = true; $("login").hidden = false;
    $("login-error").textContent = msg || "";
  }

  $("login-audio").checked = localStorage.getItem("console311.browserAudio") === "on";
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const agent = $("login-agent").value.trim();
    const password = $("login-password").value;
    const r = await api("POST", "/console/login", { agent, password });
    if (r.status === 200) {
      st.csrf = r.data.csrf_token;
      // Kept in memory only, for the browser's SIP log-in (none: the operator uses a phone).
      const inBrowser = $("login-audio").checked;
      localStorage.setItem("console311.browserAudio", inBrowser ? "on" : "off");
      st.password = inBrowser ? password : null;
      $("login-password").value = "";
      await start();
    } else {
      $("login-error").textContent = r.status === 429 ? t("too_many") : t("bad_login");
    }
  });

  $("btn-logout").addEventListener("click", async () => {
    await api("POST", "/console/logout", {});
    st.password = null;
    loggedOut("");
  });

  async function start() {
    const r = await api("GET", "/console/api/session");
    if (r.status !== 200) { loggedOut(""); return; }
    const me = r.data;
    st.me = me; st.csrf = me.csrf_token; st.services = me.services || [];
    $("agent-id").textContent = me.name ? `${me.name} (${me.agent})` : me.agent;
    $("login").hidden = true; $("app").hidden = false; $("statebar").hidden = false;
    fillReasons(); fillServices();
    onSnapshot({ state: me.state, offer: me.offer });
    if (audio() && audio().start && st.password) {
      audio().start({ user: me.sip.user, password: st.password, websocketPath: me.sip.websocket_path });
    }
    connectEvents();
  }

  function connectEvents() {
    if (st.events) st.events.close();
    const es = new EventSource("/console/events");
    st.events = es;
    const on = (name, f) => es.addEventListener(name, (ev) => { try { f(JSON.parse(ev.data)); } catch (_) { /* ignore a bad frame */ } });
    on("snapshot", (d) => { say(""); onSnapshot(d); });
    on("state", onState);
    on("offer", onOffer);
    on("call_ended", () => { say(t("call_ended")); setCaller(null); });
    es.onerror = async () => {
      say(t("offline"), true);
      // EventSource retries by itself; make sure the session is still there.
      const r = await api("GET", "/console/api/session");
      if (r.status === 200) say("");
    };
  }

  // ---- state --------------------------------------------------------------------------

  function fillReasons() {
    const sel = $("reason");
    const keep = sel.value;
    sel.textContent = "";
    for (const r of (st.me && st.me.not_ready_reasons) || []) {
      const o = document.createElement("option");
      o.value = r; o.textContent = T[lang]["r_" + r] || r.replace(/_/g, " ");
      sel.appendChild(o);
    }
    if (keep) sel.value = keep;
  }

  function onSnapshot(d) {
    st.state = d.state || null;
    st.offer = d.offer || null;
    if (st.offer) st.offer.received = Date.now();
    showState(); showOffer();
  }

  function onState(v) {
    const was = st.state && st.state.state;
    st.state = v;
    if (v.state !== "ringing" && v.state !== "on_call") { st.offer = null; }
    if (was === "ringing" && v.state !== "ringing") stopRing();
    showState(); showOffer();
  }

  function onOffer(o) {
    o.received = Date.now();
    st.offer = o;
    prefill(o);
    showOffer();
  }

  function showState() {
    const v = st.state;
    const el = $("state");
    if (!v) { el.textContent = ""; return; }
    let text = t("st_" + v.state);
    if (v.state === "paused" && v.pause_reason) text += ` — ${T[lang]["r_" + v.pause_reason] || v.pause_reason}`;
    if (v.seconds_left != null) text += ` (${v.seconds_left} ${t("seconds")})`;
    if (v.state === "logged_out" && !v.registered) text += ` (${t("st_unregistered")})`;
    el.textContent = text;
    el.className = "state s-" + v.state;
    $("wrapup").hidden = v.state !== "wrap_up";
    $("btn-ready").disabled = v.state === "available";
  }

  async function request(path, body) {
    const r = await api("POST", path, body);
    // The event stream is the one source of the agent's state: an answer computed before
    // the latest event would show a stale state.
    if (r.status >= 200 && r.status < 300) return r;
    if (r.status !== 401) say(`${t("failed")} ${(r.data && r.data.error) || r.status}`, true);
    return r;
  }

  $("btn-ready").addEventListener("click", () => request("/console/api/state", { state: "ready" }));
  $("btn-notready").addEventListener("click", () => request("/console/api/state", { state: "not_ready", reason: $("reason").value }));
  $("btn-wrap-end").addEventListener("click", () => request("/console/api/wrap-up/end", {}));
  $("btn-wrap-extend").addEventListener("click", () => request("/console/api/wrap-up/extend", {}));

  // ---- the offer ----------------------------------------------------------------------

  let ring = null;
  function startRing() {
    if (ring) return;
    try {
      const ctx = new (window.AudioContext || window.webkitAudioContext)();
      const gain = ctx.createGain(); gain.gain.value = 0; gain.connect(ctx.destination);
      const a = ctx.createOscillator(); a.frequency.value = 440; a.connect(gain); a.start();
      const b = ctx.createOscillator(); b.frequency.value = 480; b.connect(gain); b.start();
      // North American ring cadence: 2 s on, 4 s off.
      let on = false;
      const tick = () => { on = !on; gain.gain.setTargetAtTime(on ? 0.15 : 0, ctx.currentTime, 0.01); };
      tick();
      const timer = setInterval(tick, 3000);
      ring = { ctx, timer };
    } catch (_) { ring = null; }
  }
  function stopRing() {
    if (!ring) return;
    clearInterval(ring.timer);
    ring.ctx.close();
    ring = null;
  }

  // Seconds waited so far: what the server said at the offer, plus the time since.
  function waited(o) {
    return o.waited_seconds + Math.floor((Date.now() - (o.received || Date.now())) / 1000);
  }
  const LANGS = { en: "English", es: "Español" };
  setInterval(() => {
    const o = st.offer;
    if (!o || !st.state || st.state.state !== "ringing") return;
    $("c-waited").textContent = `${waited(o)} ${t("seconds")}`;
  }, 1000);

  function showOffer() {
    const o = st.offer;
    const state = st.state && st.state.state;
    const ringing = !!o && state === "ringing";
    $("banner").hidden = !ringing;
    if (ringing) {
      $("banner-number").textContent = o.number || "";
      const bits = [o.queue, LANGS[o.language] || o.language, `${waited(o)} ${t("seconds")}`];
      if (o.callback) bits.push(t("callback"));
      $("banner-detail").textContent = bits.filter(Boolean).join(" · ");
      startRing();
    } else {
      stopRing();
    }
    setCaller(o && (state === "ringing" || state === "on_call") ? o : null);
  }

  function setCaller(o) {
    $("no-caller").hidden = !!o;
    $("caller-info").hidden = !o;
    const hist = $("history");
    hist.textContent = "";
    if (!o) return;
    $("c-number").textContent = o.number || "";
    $("c-language").textContent = LANGS[o.language] || o.language || "";
    $("c-path").textContent = o.menu_words || o.menu_path || "";
    $("c-queue").textContent = o.queue || "";
    $("c-waited").textContent = `${waited(o)} ${t("seconds")}`;
    $("c-callback").textContent = o.callback ? t("yes") : t("no");
    if (!o.history || !o.history.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td"); td.colSpan = 4; td.textContent = t("none");
      tr.appendChild(td); hist.appendChild(tr);
    }
    for (const h of o.history || []) {
      const tr = document.createElement("tr");
      const date = (h.requested_datetime || "").slice(0, 10);
      for (const text of [h.service_request_id, h.service_name, t(h.status + "_status"), date]) {
        const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
      }
      tr.addEventListener("click", () => lookup(h.service_request_id));
      tr.className = "clickable";
      hist.appendChild(tr);
    }
  }

  $("btn-answer").addEventListener("click", () => {
    stopRing();
    if (browserAudio()) browserAudio().answer(st.offer);
    else say(t("answer_phone"));
  });
  $("btn-decline").addEventListener("click", async () => {
    if (!st.offer) return;
    stopRing();
    await request("/console/api/offer/decline", { caller: st.offer.caller });
  });

  // ---- call controls ------------------------------------------------------------------

  function hook(name, ...args) {
    if (browserAudio() && browserAudio()[name]) { browserAudio()[name](...args); return true; }
    say(t("use_phone"));
    return false;
  }
  function toggle(btn, name) {
    const on = btn.getAttribute("aria-pressed") !== "true";
    if (hook(name, on)) btn.setAttribute("aria-pressed", String(on));
  }
  $("btn-mute").addEventListener("click", () => toggle($("btn-mute"), "mute"));
  $("btn-hold").addEventListener("click", () => toggle($("btn-hold"), "hold"));
  $("btn-hangup").addEventListener("click", () => request("/console/api/call/hangup", {}));
  for (const k of ["1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "0", "#"]) {
    const b = document.createElement("button");
    b.textContent = k; b.className = "key";
    b.addEventListener("click", () => hook("sendDtmf", k));
    $("keypad").appendChild(b);
  }
  // Transfers, 911 first, go through the server (the same transfer a phone's REFER starts:
  // 911's routes and audit, the dial plan), whatever the phone or the browser's audio can do.
  async function transferTo(to) {
    const r = await request("/console/api/call/transfer", { to });
    if (r.status === 202) say(t("transferring"));
  }
  $("btn-911").addEventListener("click", () => transferTo("911"));
  $("transfer-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const to = $("transfer-to").value.trim();
    if (to) transferTo(to);
  });

  // ---- tickets ------------------------------------------------------------------------

  function fillServices() {
    const sel = $("t-service");
    sel.textContent = "";
    const pick = document.createElement("option");
    pick.value = ""; pick.textContent = t("choose_service");
    sel.appendChild(pick);
    const groups = new Map();
    for (const s of st.services) {
      const g = s.group || "";
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(s);
    }
    for (const [g, list] of groups) {
      const parent = g ? document.createElement("optgroup") : sel;
      if (g) { parent.label = g; sel.appendChild(parent); }
      for (const s of list) {
        const o = document.createElement("option");
        o.value = s.service_code; o.textContent = s.service_name;
        parent.appendChild(o);
      }
    }
  }

  function prefill(o) {
    if (o && o.service_code) $("t-service").value = o.service_code;
    if (o && o.zipcode) $("t-zip").value = o.zipcode;
    $("filed").hidden = true;
  }

  $("ticket-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await request("/console/api/requests", {
      service_code: $("t-service").value,
      address: $("t-address").value,
      zipcode: $("t-zip").value,
      description: $("t-description").value,
    });
    if (r.status === 201) {
      $("filed-number").textContent = r.data.service_request_id.replace(/(\d{4})(\d{4})/, "$1 $2");
      $("filed").hidden = false;
      $("t-address").value = ""; $("t-zip").value = ""; $("t-description").value = "";
      say(t("saved"));
    }
  });

  async function lookup(id) {
    const r = await api("GET", `/console/api/requests/${encodeURIComponent(id)}`);
    if (r.status !== 200) { say(t("not_found"), true); $("update-form").hidden = true; return; }
    const x = r.data;
    $("lookup-id").value = x.service_request_id;
    $("u-summary").textContent = `${x.service_request_id} · ${x.service_name} · ${(x.address || x.zipcode || "")} · ${x.requested_datetime.slice(0, 10)}`;
    $("u-status").value = x.status;
    $("u-notes").value = x.status_notes || "";
    $("update-form").hidden = false;
  }
  $("lookup-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("lookup-id").value.replace(/\D/g, "");
    if (id) lookup(id);
  });
  $("update-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = $("lookup-id").value.replace(/\D/g, "");
    const r = await request(`/console/api/requests/${id}`, { status: $("u-status").value, status_notes: $("u-notes").value });
    if (r.status === 200) say(t("updated"));
  });

  // ---- start --------------------------------------------------------------------------

  window.console311.ui = { say, t };

  $("lang-en").addEventListener("click", () => { lang = "en"; localStorage.setItem("console311.lang", lang); applyLang(); });
  $("lang-es").addEventListener("click", () => { lang = "es"; localStorage.setItem("console311.lang", lang); applyLang(); });
  applyLang();
  // A session may still be live (a reload): use it, else show the log-in.
  api("GET", "/console/api/session").then((r) => {
    if (r.status === 200) start(); else loggedOut("");
  });
})();
