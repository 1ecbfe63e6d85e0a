// The supervisor's wallboard: live queues, agents, today's figures and alarms from the
// server's event stream (/supervisor/events), charts drawn here in SVG from the calls report,
// and the supervisor's actions (force an agent's state, hang up, transfer, listen, whisper,
// barge). No library, no CDN; text is set with textContent only.
//
// Listen, whisper and barge in the browser: with "Audio in this browser" at log-in, the page
// registers the supervisor over SIP over WebSocket with the console's audio.js (JsSIP, /sip).
// A click on Listen, Whisper or Barge asks the server to call the supervisor with a fresh
// token; the server's INVITE carries it back (X-311-Monitor-Token) and is answered by the page
// (WebRTC), while any other INVITE to this page is declined. The monitor bar switches the mode
// with the keys 4, 5 and 6 (RFC 4733, as on a desk phone) and stops; the microphone is muted
// while listening. Without browser audio the server calls the supervisor's desk phone.
"use strict";

(() => {
  const T = {
    en: {
      title: "311 Supervisor wallboard", supervisor: "Supervisor", logout: "Log out",
      login_title: "Log in", agent_id: "Supervisor id", password: "Password", login: "Log in",
      alarms: "Alarms", no_alarms: "No alarms", today: "Today", offered: "Offered",
      answered: "Answered", abandoned: "Abandoned", service_level: "Service level",
      abandon_rate: "Abandonment", asa: "Speed of answer", queues: "Queues", queue: "Queue",
      waiting: "Waiting", longest: "Longest wait", ready_agents: "Ready", logged_in: "Logged in",
      target: "Target", callers: "Callers waiting", call: "Call", waited: "Waited",
      ringing: "Ringing", actions: "Actions", agents: "Agents", agent: "Agent", state: "State",
      in_state: "In state", current_call: "Current call", force_state: "Force state",
      call_actions: "Call", charts: "Per hour",
      chart_calls: "Calls offered and answered per hour: today and the same day last week",
      chart_sl: "Service level per hour, today", last_week: "Offered, same day last week",
      ready: "Ready", not_ready: "Not ready", log_out_agent: "Log out", hangup: "Hang up",
      transfer: "Transfer", transfer_to: "Transfer to (911, a line, an agent or a queue)",
      listen: "Listen", whisper: "Whisper", barge: "Barge",
      monitor_off: "Listen, whisper and barge are not available on this server",
      live: "Live", reconnecting: "Reconnecting…", not_supervisor: "This account is not a supervisor's.",
      wrong_login: "Wrong id or password.", too_many: "Too many failed log-ins; try again later.",
      failed: "The server refused:", confirm_hangup: "Hang up call",
      s_logged_out: "Logged out", s_available: "Ready", s_ringing: "Ringing", s_on_call: "On a call",
      s_wrap_up: "Wrap-up", s_no_answer_pause: "No answer", s_paused: "Not ready",
      a_service_level: "Service level in queue {q} over the last 15 minutes is {v}, under the target of {t}",
      a_long_wait: "Call {c} in queue {q} has waited {v} (alarm at {t})",
      a_no_agent_ready: "{n} waiting in queue {q} and no agent is ready",
      seconds: "s", none: "–", callback: "call-back",
      r_break: "Break", r_lunch: "Lunch", r_training: "Training", r_after_call_work: "After-call work",
      browser_audio: "Audio in this browser (headset)", audio_ready: "Browser audio ready",
      audio_connecting: "Browser audio connecting…", audio_lost: "Browser audio lost: reconnecting…",
      audio_off: "", audio_no_microphone: "The browser may not use the microphone: allow it for this page, then try again.",
      audio_no_codec: "This browser offers no audio codec the server speaks (G.711 PCMU/PCMA).",
      audio_webrtc: "The browser's audio connection failed:", audio_call_failed: "The call's audio failed:",
      audio_register_failed: "The browser's phone could not log in:", audio_blocked: "The browser did not play the call:",
      monitoring: "Monitoring", stop: "Stop", mon_connecting: "Connecting to call {c}…",
      mon_listen: "Listening to call {c}", mon_whisper: "Whispering to the operator on call {c}",
      mon_barge: "Talking with both sides of call {c}", mon_phone: "Your phone is being called for call {c}",
      mic_note: "Your microphone is off while you listen; in whisper the operator hears you, in barge both do.",
    },
    es: {
      title: "Panel de supervisión 311", supervisor: "Supervisor", logout: "Cerrar sesión",
      login_title: "Iniciar sesión", agent_id: "Id de supervisor", password: "Contraseña", login: "Entrar",
      alarms: "Alarmas", no_alarms: "Sin alarmas", today: "Hoy", offered: "Ofrecidas",
      answered: "Atendidas", abandoned: "Abandonadas", service_level: "Nivel de servicio",
      abandon_rate: "Abandono", asa: "Velocidad de respuesta", queues: "Colas", queue: "Cola",
      waiting: "En espera", longest: "Espera más larga", ready_agents: "Listos", logged_in: "Conectados",
      target: "Objetivo", callers: "Llamadas en espera", call: "Llamada", waited: "Esperó",
      ringing: "Timbrando", actions: "Acciones", agents: "Agentes", agent: "Agente", state: "Estado",
      in_state: "En el estado", current_call: "Llamada actual", force_state: "Forzar estado",
      call_actions: "Llamada", charts: "Por hora",
      chart_calls: "Llamadas ofrecidas y atendidas por hora: hoy y el mismo día de la semana pasada",
      chart_sl: "Nivel de servicio por hora, hoy", last_week: "Ofrecidas, mismo día la semana pasada",
      ready: "Listo", not_ready: "No listo", log_out_agent: "Desconectar", hangup: "Colgar",
      transfer: "Transferir", transfer_to: "Transferir a (911, una línea, un agente o una cola)",
      listen: "Escuchar", whisper: "Susurrar", barge: "Intervenir",
      monitor_off: "Escuchar, susurrar e intervenir no están disponibles en este servidor",
      live: "En vivo", reconnecting: "Reconectando…", not_supervisor: "Esta cuenta no es de supervisor.",
      wrong_login: "Id o contraseña incorrectos.", too_many: "Demasiados intentos fallidos; inténtelo más tarde.",
      failed: "El servidor rechazó:", confirm_hangup: "Colgar la llamada",
      s_logged_out: "Desconectado", s_available: "Listo", s_ringing: "Timbrando", s_on_call: "En llamada",
      s_wrap_up: "Cierre", s_no_answer_pause: "Sin respuesta", s_paused: "No listo",
      a_service_level: "El nivel de servicio de la cola {q} en los últimos 15 minutos es {v}, bajo el objetivo de {t}",
      a_long_wait: "La llamada {c} de la cola {q} lleva {v} esperando (alarma a los {t})",
      a_no_agent_ready: "{n} en espera en la cola {q} y ningún agente está listo",
      seconds: "s", none: "–", callback: "devolución",
      r_break: "Descanso", r_lunch: "Almuerzo", r_training: "Capacitación", r_after_call_work: "Trabajo posterior",
      browser_audio: "Audio en este navegador (auriculares)", audio_ready: "Audio del navegador listo",
      audio_connecting: "Conectando el audio del navegador…", audio_lost: "Audio del navegador perdido: reconectando…",
      audio_off: "", audio_no_microphone: "El navegador no puede usar el micrófono: permítalo para esta página e inténtelo de nuevo.",
      audio_no_codec: "Este navegador no ofrece ningún códec de audio que el servidor use (G.711 PCMU/PCMA).",
      audio_webrtc: "Falló la conexión de audio del navegador:", audio_call_failed: "Falló el audio de la llamada:",
      audio_register_failed: "El teléfono del navegador no pudo iniciar sesión:", audio_blocked: "El navegador no reprodujo la llamada:",
      monitoring: "Supervisión", stop: "Terminar", mon_connecting: "Conectando con la llamada {c}…",
      mon_listen: "Escuchando la llamada {c}", mon_whisper: "Susurrando al agente en la llamada {c}",
      mon_barge: "Hablando con ambas partes de la llamada {c}", mon_phone: "Se está llamando a su teléfono para la llamada {c}",
      mic_note: "Su micrófono está apagado mientras escucha; al susurrar le oye el agente, al intervenir le oyen ambos.",
    },
  };
  const stored = localStorage.getItem("wallboard311.lang");
  let lang = stored || ((navigator.language || "en").startsWith("es") ? "es" : "en");
  const t = (k) => (T[lang] && T[lang][k]) || T.en[k] || k;
  const fill = (s, vars) => s.replace(/\{(\w)\}/g, (_, k) => String(vars[k]));
  const $ = (id) => document.getElementById(id);

  let csrf = null;
  let reasons = [];
  let monitoring = false;
  // The SIP password, in memory only, when the supervisor chose audio in this browser.
  let sipPassword = null;
  // The call being monitored from this page: { call, mode, state: "connecting" | "up" }.
  let mon = null;
  const audio = () => (window.console311 && window.console311.audio) || null;
  const browserAudio = () => (audio() && audio().active() && audio().status().registered ? audio() : null);
  let source = null;
  let lastToday = null;

  const pct = (v) => (v === null || v === undefined ? t("none") : (v * 100).toFixed(1) + "%");
  const secs = (v) => (v === null || v === undefined ? t("none") : Math.round(v) + " " + t("seconds"));
  const clock = (s) => {
    const m = Math.floor(s / 60), r = s % 60;
    return m + ":" + String(r).padStart(2, "0");
  };

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function applyLang() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach((e) => { e.textContent = t(e.dataset.i18n); });
    $("lang-en").setAttribute("aria-pressed", String(lang === "en"));
    $("lang-es").setAttribute("aria-pressed", String(lang === "es"));
    if (window.wallboard) render(window.wallboard);
    renderMonitor();
  }

  async function api(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: {} };
    if (method !== "GET") {
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-CSRF-Token"] = csrf || "";
      opts.body = JSON.stringify(body || {});
    }
    const r = await fetch(path, opts);
    let v = null;
    try { v = await r.json(); } catch (_) { v = null; }
    return { status: r.status, body: v };
  }

  function showError(msg) { $("error").textContent = msg || ""; }

  // audio.js speaks through these.
  window.console311 = window.console311 || {};
  window.console311.ui = { say: (msg, bad) => showError(bad ? msg : ""), t };

  // ---- listen, whisper, barge ----

  const KEYS = { listen: "4", whisper: "5", barge: "6" };

  function token() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function renderMonitor() {
    $("monitor").hidden = !mon;
    if (!mon) return;
    const key = mon.state === "phone" ? "mon_phone" : mon.state === "up" ? "mon_" + mon.mode : "mon_connecting";
    $("monitor-what").textContent = fill(t(key), { c: mon.call });
    for (const b of document.querySelectorAll("#monitor .mode")) {
      b.setAttribute("aria-pressed", String(b.dataset.mode === mon.mode));
      b.disabled = mon.state !== "up";
    }
    $("mon-stop").disabled = mon.state === "phone";
  }

  async function startMonitor(call, mode) {
    const a = browserAudio();
    if (!a && audio() && audio().active()) {
      // Audio in this browser, not registered (yet, or any more): the server would call this
      // page, which could not answer.
      showError(t("audio_connecting"));
      return;
    }
    if (!a) {
      // The server calls the supervisor's registered phone.
      const r = await act(`/supervisor/api/calls/${call}/monitor`, { mode });
      if (r.status < 400) { mon = { call, mode, state: "phone" }; renderMonitor(); setTimeout(() => { if (mon && mon.state === "phone") { mon = null; renderMonitor(); } }, 5000); }
      return;
    }
    const tok = token();
    a.expect((req) => req.getHeader("X-311-Monitor-Token") === tok, 30000, { muted: mode === "listen" });
    mon = { call, mode, state: "connecting" };
    renderMonitor();
    const r = await act(`/supervisor/api/calls/${call}/monitor`, { mode, token: tok });
    if (r.status >= 400) {
      a.expect(() => false, 0);
      mon = null;
      renderMonitor();
    }
  }

  // The mode as the phone switches it: the key first, then the microphone on (whisper,
  // barge); or the microphone off first, then the key (listen).
  function switchMode(mode) {
    const a = browserAudio();
    if (!a || !mon || mon.state !== "up" || mode === mon.mode) return;
    if (mode === "listen") a.mute(true);
    a.sendDtmf(KEYS[mode]);
    if (mode !== "listen") a.mute(false);
    mon.mode = mode;
    renderMonitor();
  }

  function onAudioChange(what) {
    if (!mon) return;
    if (what === "up") mon.state = "up";
    else if (what === "ended") mon = null;
    renderMonitor();
  }

  for (const b of document.querySelectorAll("#monitor .mode")) b.addEventListener("click", () => switchMode(b.dataset.mode));
  $("mon-stop").addEventListener("click", () => {
    const a = audio();
    if (a) a.hangup();
    mon = null;
    renderMonitor();
  });

  async function act(path, body) {
    const r = await api("POST", path, body);
    if (r.status >= 400) showError(t("failed") + " " + ((r.body && r.body.error) || r.status));
    else showError("");
    return r;
  }

  // ---- rendering ----

  function setTile(id, value, text) {
    const e = $(id);
    e.dataset.value = value === null || value === undefined ? "" : String(value);
    e.textContent = text;
  }

  function renderToday(b) {
    const d = b.today;
    setTile("t-offered", d && d.offered, d ? String(d.offered) : t("none"));
    setTile("t-answered", d && d.answered, d ? String(d.answered) : t("none"));
    setTile("t-abandoned", d && d.abandoned, d ? String(d.abandoned) : t("none"));
    setTile("t-sl", d && d.service_level, pct(d && d.service_level));
    setTile("t-abandon-rate", d && d.abandon_rate, pct(d && d.abandon_rate));
    setTile("t-asa", d && d.asa_seconds, secs(d && d.asa_seconds));
    const q = b.queues[0];
    $("t-sl-target").textContent = q ? `${t("target")} ${pct(q.service_level_target)} / ${q.service_level_seconds} ${t("seconds")}` : "";
    const sl = d && d.service_level;
    $("t-sl").parentElement.classList.toggle("miss", q !== undefined && sl !== null && sl !== undefined && sl < q.service_level_target);
  }

  function alarmText(a) {
    switch (a.kind) {
      case "service_level": return fill(t("a_service_level"), { q: a.queue, v: pct(a.service_level), t: pct(a.target) });
      case "long_wait": return fill(t("a_long_wait"), { c: a.caller, q: a.queue, v: clock(a.waited_seconds), t: clock(a.threshold_seconds) });
      case "no_agent_ready": return fill(t("a_no_agent_ready"), { n: a.waiting, q: a.queue });
      default: return a.kind;
    }
  }

  function renderAlarms(b) {
    const ul = $("alarms");
    ul.replaceChildren();
    if (b.alarms.length === 0) { ul.appendChild(el("li", t("no_alarms"), "quiet")); return; }
    for (const a of b.alarms) {
      const li = el("li", alarmText(a), "alarm a-" + a.kind);
      li.dataset.kind = a.kind;
      li.dataset.queue = a.queue;
      ul.appendChild(li);
    }
  }

  function renderQueues(b) {
    const body = document.querySelector("#queues tbody");
    body.replaceChildren();
    for (const q of b.queues) {
      const tr = el("tr");
      tr.dataset.queue = q.name;
      const d = q.today;
      const cells = [
        [q.name, "name"], [q.waiting, "waiting"], [clock(q.longest_wait_seconds), "longest"],
        [q.agents_ready, "ready"], [q.agents_logged_in, "logged-in"],
        [pct(d && d.service_level), "sl"], [pct(q.service_level_target) + " / " + q.service_level_seconds + " " + t("seconds"), "target"],
        [pct(d && d.abandon_rate), "abandon-rate"], [secs(d && d.asa_seconds), "asa"],
      ];
      for (const [v, cls] of cells) tr.appendChild(el("td", v, cls));
      if (d && d.service_level !== null && d.service_level < q.service_level_target) tr.querySelector(".sl").classList.add("miss");
      if (q.waiting > 0 && q.agents_ready === 0) tr.querySelector(".ready").classList.add("miss");
      body.appendChild(tr);
    }
    const cb = document.querySelector("#callers tbody");
    cb.replaceChildren();
    for (const q of b.queues) {
      for (const c of q.callers) {
        const tr = el("tr");
        tr.dataset.call = String(c.caller);
        tr.appendChild(el("td", c.caller + (c.callback ? " (" + t("callback") + ")" : "")));
        tr.appendChild(el("td", c.queue));
        const w = el("td", clock(c.waited_seconds), "waited");
        if (q.max_wait_alarm_seconds > 0 && c.waited_seconds >= q.max_wait_alarm_seconds) w.classList.add("miss");
        tr.appendChild(w);
        tr.appendChild(el("td", c.ringing || ""));
        const td = el("td", null, "actions");
        td.appendChild(callButtons(c.caller, false));
        tr.appendChild(td);
        cb.appendChild(tr);
      }
    }
  }

  function button(label, cls, onclick) {
    const b = el("button", label, cls);
    b.type = "button";
    b.addEventListener("click", onclick);
    return b;
  }

  function callButtons(call, bridged) {
    const span = el("span", null, "buttons");
    span.appendChild(button(t("hangup"), "danger hangup", async () => {
      if (!window.confirm(t("confirm_hangup") + " " + call + "?")) return;
      await act(`/supervisor/api/calls/${call}/hangup`);
    }));
    span.appendChild(button(t("transfer"), "transfer", async () => {
      const to = window.prompt(t("transfer_to"), "");
      if (!to) return;
      await act(`/supervisor/api/calls/${call}/transfer`, { to });
    }));
    if (bridged) {
      // Monitoring (listen / whisper / barge) is served by its own part of the server.
      for (const mode of ["listen", "whisper", "barge"]) {
        const b = button(t(mode), "monitor m-" + mode, () => startMonitor(call, mode));
        if (!monitoring) { b.disabled = true; b.title = t("monitor_off"); }
        else if (mon && mon.state !== "phone") b.disabled = true;
        span.appendChild(b);
      }
    }
    return span;
  }

  function renderAgents(b) {
    const body = document.querySelector("#agents tbody");
    body.replaceChildren();
    for (const a of b.agents) {
      const tr = el("tr");
      tr.dataset.agent = a.id;
      tr.appendChild(el("td", a.name ? `${a.name} (${a.id})` : a.id));
      let st = t("s_" + a.state);
      if (a.pause_reason) st += " — " + (T[lang]["r_" + a.pause_reason] || a.pause_reason);
      tr.appendChild(el("td", st, "state s-" + a.state));
      tr.appendChild(el("td", a.state_seconds === null || a.state_seconds === undefined ? "" : clock(a.state_seconds), "in-state"));
      const call = (a.state === "on_call" || a.state === "ringing") && a.caller !== null ? a.caller : null;
      tr.appendChild(el("td", call === null ? "" : `${call}${a.queue ? " · " + a.queue : ""}`, "call"));
      const force = el("td", null, "force");
      force.appendChild(button(t("ready"), "ok f-ready", () => act(`/supervisor/api/agents/${encodeURIComponent(a.id)}/state`, { state: "ready" })));
      const sel = el("select");
      sel.setAttribute("aria-label", t("not_ready"));
      for (const r of reasons) {
        const o = el("option", T[lang]["r_" + r] || r.replace(/_/g, " "));
        o.value = r;
        sel.appendChild(o);
      }
      force.appendChild(sel);
      force.appendChild(button(t("not_ready"), "f-not-ready", () => act(`/supervisor/api/agents/${encodeURIComponent(a.id)}/state`, { state: "not_ready", reason: sel.value })));
      force.appendChild(button(t("log_out_agent"), "quiet f-logout", () => act(`/supervisor/api/agents/${encodeURIComponent(a.id)}/state`, { state: "logged_out" })));
      tr.appendChild(force);
      const ca = el("td", null, "call-actions");
      if (a.state === "on_call" && call !== null) ca.appendChild(callButtons(call, true));
      tr.appendChild(ca);
      body.appendChild(tr);
    }
  }

  function render(b) {
    window.wallboard = b;
    renderToday(b);
    renderAlarms(b);
    renderQueues(b);
    renderAgents(b);
    const key = b.today ? `${b.today.offered}/${b.today.answered}/${b.today.abandoned}` : "";
    if (key !== lastToday) { lastToday = key; charts(b); }
  }

  // ---- charts (SVG, from the calls report) ----

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const day = (ms) => new Date(ms).toISOString().slice(0, 10);

  async function hourly(fromMs) {
    const r = await api("GET", `/supervisor/api/reports/calls?from=${day(fromMs)}&to=${day(fromMs + 86400000)}&interval=hour`);
    const hours = new Array(24).fill(null);
    if (r.status === 200 && r.body) {
      for (const row of r.body.rows) hours[new Date(row.interval_start).getUTCHours()] = row;
    }
    return hours;
  }

  function axes(g, max, fmt) {
    const W = 720, H = 220, L = 44, B = 24, top = 10;
    g.appendChild(svg("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, class: "axis" }));
    for (let i = 0; i <= 4; i++) {
      const y = H - B - (H - B - top) * i / 4;
      g.appendChild(svg("line", { x1: L, y1: y, x2: W - 4, y2: y, class: "grid" }));
      g.appendChild(svg("text", { x: L - 6, y: y + 4, class: "tick", "text-anchor": "end" }, fmt(max * i / 4)));
    }
    for (let h = 0; h < 24; h += 3) {
      g.appendChild(svg("text", { x: L + (W - L - 4) * (h + 0.5) / 24, y: H - 6, class: "tick", "text-anchor": "middle" }, String(h).padStart(2, "0")));
    }
    return { W, H, L, B, top, slot: (W - L - 4) / 24, y: (v) => H - B - (H - B - top) * (max > 0 ? v / max : 0) };
  }

  async function charts(b) {
    const now = Date.now();
    const [today, lastWeek] = await Promise.all([hourly(now), hourly(now - 7 * 86400000)]);
    const calls = $("chart-calls");
    calls.replaceChildren();
    const max = Math.max(4, ...today.map((r) => (r ? r.offered : 0)), ...lastWeek.map((r) => (r ? r.offered : 0)));
    const a = axes(calls, max, (v) => String(Math.round(v)));
    const pts = [];
    for (let h = 0; h < 24; h++) {
      const x = a.L + a.slot * h;
      const r = today[h];
      if (r) {
        calls.appendChild(svg("rect", { x: x + 2, y: a.y(r.offered), width: a.slot / 2 - 2, height: a.H - a.B - a.y(r.offered), class: "bar offered" }, ""));
        calls.appendChild(svg("rect", { x: x + a.slot / 2, y: a.y(r.answered), width: a.slot / 2 - 2, height: a.H - a.B - a.y(r.answered), class: "bar answered" }, ""));
      }
      const w = lastWeek[h];
      pts.push(`${x + a.slot / 2},${a.y(w ? w.offered : 0)}`);
    }
    calls.appendChild(svg("polyline", { points: pts.join(" "), class: "lastweek" }));
    const sl = $("chart-sl");
    sl.replaceChildren();
    const s = axes(sl, 1, (v) => Math.round(v * 100) + "%");
    const target = b.queues[0] ? b.queues[0].service_level_target : 0.8;
    for (let h = 0; h < 24; h++) {
      const r = today[h];
      if (r && r.service_level !== null) {
        const y = s.y(r.service_level);
        sl.appendChild(svg("rect", { x: s.L + s.slot * h + 3, y, width: s.slot - 6, height: s.H - s.B - y, class: "bar " + (r.service_level < target ? "miss" : "met") }));
      }
    }
    sl.appendChild(svg("line", { x1: s.L, x2: s.W - 4, y1: s.y(target), y2: s.y(target), class: "target" }));
  }

  // ---- session and stream ----

  function connect() {
    if (source) source.close();
    source = new EventSource("/supervisor/events");
    source.addEventListener("snapshot", (e) => {
      $("live").textContent = t("live");
      render(JSON.parse(e.data));
    });
    source.onerror = () => {
      $("live").textContent = t("reconnecting");
      // EventSource retries by itself; a session that ended shows the log-in again.
      api("GET", "/supervisor/api/session").then((r) => { if (r.status === 401 || r.status === 403) showLogin(); });
    };
  }

  function showLogin() {
    if (source) { source.close(); source = null; }
    if (audio()) audio().stop();
    sipPassword = null;
    mon = null;
    renderMonitor();
    $("board").hidden = true;
    $("who").hidden = true;
    $("btn-logout").hidden = true;
    $("login").hidden = false;
  }

  async function start() {
    const r = await api("GET", "/supervisor/api/session");
    if (r.status !== 200) {
      showLogin();
      if (r.status === 403) $("login-error").textContent = t("not_supervisor");
      return;
    }
    csrf = r.body.csrf_token;
    reasons = r.body.not_ready_reasons || [];
    monitoring = !!r.body.monitoring;
    $("me").textContent = r.body.agent;
    $("login").hidden = true;
    $("who").hidden = false;
    $("btn-logout").hidden = false;
    $("board").hidden = false;
    const a = audio();
    if (a && sipPassword && !a.active()) {
      a.start({
        user: r.body.agent, password: sipPassword, websocketPath: "/sip",
        onlyExpected: true, onChange: onAudioChange, userAgent: "ivr311-wallboard",
      });
    }
    connect();
  }

  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("login-error").textContent = "";
    const r = await fetch("/console/login", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ agent: $("login-agent").value, password: $("login-password").value }),
    });
    const v = await r.json().catch(() => ({}));
    if (r.status === 429) { $("login-error").textContent = t("too_many"); return; }
    if (r.status !== 200) { $("login-error").textContent = t("wrong_login"); return; }
    if (v.role !== "supervisor") { $("login-error").textContent = t("not_supervisor"); return; }
    const inBrowser = $("login-audio").checked;
    localStorage.setItem("wallboard311.browserAudio", inBrowser ? "on" : "off");
    sipPassword = inBrowser ? $("login-password").value : null;
    $("login-password").value = "";
    start();
  });

  $("btn-logout").addEventListener("click", async () => {
    if (source) { source.close(); source = null; }
    // Ends the session only: a supervisor's own state in the queues is not changed here.
    await act("/supervisor/api/logout");
    showLogin();
  });

  $("lang-en").addEventListener("click", () => { lang = "en"; localStorage.setItem("wallboard311.lang", lang); applyLang(); });
  $("lang-es").addEventListener("click", () => { lang = "es"; localStorage.setItem("wallboard311.lang", lang); applyLang(); });
  $("login-audio").checked = localStorage.getItem("wallboard311.browserAudio") === "on";
  applyLang();
  start();
})();
