// The live page: the session's stream from page load (WebRTC, else fMP4 over a WebSocket
// into Media Source Extensions), chat, transcript, interrupt, microphone, avatar picker.
// No token is stored by the page: with auth configured, the token is posted once to
// POST /auth, whose HttpOnly cookie then authorises the page's calls, sockets and media.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video");
const params = new URLSearchParams(location.search);
const forced = params.get("transport"); // "webrtc" or "mse", for testing a path

const live = {
  session: params.get("session") || "default",
  avatar: params.get("avatar") || null,
  transport: null,     // "webrtc" | "mse" once media flows
  pc: null, whepUrl: null, micSender: null, micTrack: null,
  ws: null, events: null,
  ready: false, starting: false, generation: 0,
  marks: {},           // milliseconds since page load at each start-up step
};
const mark = (name) => { live.marks[name] = Math.round(performance.now()); };
window.musetalkLive = live; // for the browser test and the console

function setStatus(text, kind = "ok") {
  $("status").textContent = text;
  $("status").dataset.kind = kind;
}

function showError(text) { $("error").textContent = text || ""; }

class HttpError extends Error {
  constructor(status, message, retryAfter) { super(message); this.status = status; this.retryAfter = retryAfter; }
}

async function call(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  let data = null;
  try { data = await response.json(); } catch (_) { /* no JSON body */ }
  if (!response.ok) {
    let message = data && data.message ? data.message : `HTTP ${response.status}`;
    if (data && data.hint) message += ` (${data.hint})`;
    if (response.status === 503 && data && data.error === "overloaded") message = `Server busy: ${message}`;
    throw new HttpError(response.status, message, response.headers.get("Retry-After"));
  }
  return data;
}

const sessionPath = (suffix) => `/sessions/${encodeURIComponent(live.session)}${suffix}`;
const wsUrl = (path) => `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;

// ---- health: loading, ready, gone ----------------------------------------------------------

async function checkHealth() {
  let health = null;
  try {
    const response = await fetch("/health", { cache: "no-store" });
    health = await response.json();
  } catch (_) {
    live.ready = false;
    setStatus("Server unreachable, retrying…", "error");
    return;
  }
  if (health.status === "loading") {
    setStatus("Loading models…", "busy");
  } else if (health.status === "error") {
    setStatus("Server failed to start", "error");
    showError(health.error ? health.error.message : "see the server log");
  } else if (health.ready) {
    fillAvatars(health.avatars || [], health.default_avatar);
    if (!live.ready) {
      live.ready = true;
      start();
    }
    return;
  }
  live.ready = false;
}

function fillAvatars(avatars, fallback) {
  const select = $("avatar");
  if (select.options.length === avatars.length) return;
  select.replaceChildren(...avatars.map((id) => new Option(id, id)));
  select.value = live.avatar || (avatars.includes(fallback) ? fallback : avatars[0]);
}

// ---- starting the stream -------------------------------------------------------------------

async function start() {
  if (live.starting) return;
  live.starting = true;
  const generation = ++live.generation;
  $("session").textContent = live.session;
  $("download").href = `/download?session_id=${encodeURIComponent(live.session)}`;
  setStatus("Starting the live session…", "busy");
  try {
    const body = live.avatar ? { avatar_id: live.avatar } : {};
    mark("attach");
    const state = await call("POST", sessionPath("/live"), body);
    mark("attached");
    live.avatar = state.avatar_id;
    $("avatar").value = state.avatar_id;
    openEvents();
    await openMedia();
    if (generation !== live.generation) return;
    showError("");
    setStatus(state.state === "speaking" ? "Speaking" : "Idle", "ok");
  } catch (err) {
    const retry = err.retryAfter ? ` Retrying in ${err.retryAfter} s.` : "";
    if (err.status === 401) {
      $("login").hidden = false;
      setStatus("Log in", "error");
      showError("This server needs its token.");
      return;
    }
    setStatus(err.status === 503 ? "Unavailable" : "Error", "error");
    showError(`${err.message}.${retry}`);
    live.ready = false; // the health loop restarts us
  } finally {
    live.starting = false;
  }
}

async function openMedia() {
  const webrtc = forced !== "mse" && "RTCPeerConnection" in window;
  if (webrtc) {
    try {
      await openWebRTC();
      return;
    } catch (err) {
      closeWebRTC();
      if (forced === "webrtc") throw err;
      console.warn("WebRTC failed, falling back to MSE:", err);
    }
  }
  await openMSE();
}

function attachStream(stream, transport) {
  live.transport = transport;
  $("badge").textContent = transport === "webrtc" ? "WebRTC" : "MSE";
  $("mic").disabled = transport !== "webrtc";
  if (stream) video.srcObject = stream;
  playVideo();
}

function playVideo() {
  const attempt = video.play();
  if (attempt) attempt.catch(() => { /* autoplay refused: the unmute button starts it */ });
  $("unmute").hidden = !video.muted;
}

// ---- WebRTC (WHEP-style: one offer, one answer) --------------------------------------------

async function openWebRTC() {
  const { ice_servers: iceServers } = await call("GET", "/live/ice-servers");
  const pc = new RTCPeerConnection({ iceServers });
  live.pc = pc;
  const stream = new MediaStream();
  pc.addTransceiver("video", { direction: "recvonly" });
  // sendrecv, so the microphone can start later without a new offer (replaceTrack).
  live.micSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
  pc.ontrack = (event) => stream.addTrack(event.track);
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 1000);
  mark("gathered");
  const response = await fetch(sessionPath("/whep"), {
    method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    let message = `WebRTC offer refused (HTTP ${response.status})`;
    try { message = (await response.json()).message; } catch (_) { /* not JSON */ }
    throw new HttpError(response.status, message, response.headers.get("Retry-After"));
  }
  live.whepUrl = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  mark("answered");
  await connected(pc, 8000);
  mark("connected");
  pc.onconnectionstatechange = () => {
    if (["failed", "disconnected", "closed"].includes(pc.connectionState) && live.pc === pc) {
      setStatus("Connection lost, reconnecting…", "error");
      reconnect();
    }
  };
  attachStream(stream, "webrtc");
}

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs); // use the candidates found so far
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

function connected(pc, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("WebRTC did not connect")), timeoutMs);
    const check = () => {
      if (pc.connectionState === "connected") { clearTimeout(timer); resolve(); }
      if (pc.connectionState === "failed") { clearTimeout(timer); reject(new Error("WebRTC failed")); }
    };
    pc.addEventListener("connectionstatechange", check);
    check();
  });
}

function closeWebRTC() {
  if (live.whepUrl) fetch(live.whepUrl, { method: "DELETE", keepalive: true }).catch(() => {});
  if (live.pc) live.pc.close();
  stopMic();
  live.pc = live.whepUrl = live.micSender = null;
}

// ---- fMP4 over a WebSocket into Media Source Extensions ------------------------------------

function openMSE() {
  return new Promise((resolve, reject) => {
    if (!("MediaSource" in window)) { reject(new Error("this browser has neither WebRTC nor MSE")); return; }
    const ws = new WebSocket(wsUrl(sessionPath("/mse")));
    ws.binaryType = "arraybuffer";
    live.ws = ws;
    let buffer = null;
    const queue = [];
    const pump = () => {
      if (!buffer || buffer.updating || !queue.length) return;
      buffer.appendBuffer(queue.shift());
    };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") {
        const message = JSON.parse(event.data);
        if (message.type === "error") { showError(message.message); return; }
        if (message.type !== "init") return;
        if (!MediaSource.isTypeSupported(message.mime)) { reject(new Error(`cannot play ${message.mime}`)); return; }
        const source = new MediaSource();
        video.srcObject = null;
        video.src = URL.createObjectURL(source);
        source.addEventListener("sourceopen", () => {
          buffer = source.addSourceBuffer(message.mime);
          buffer.addEventListener("updateend", () => { keepLive(buffer); pump(); });
          pump();
          attachStream(null, "mse");
          resolve();
        }, { once: true });
        return;
      }
      queue.push(event.data);
      pump();
    };
    ws.onerror = () => reject(new Error("the MSE stream could not open"));
    ws.onclose = () => {
      if (live.ws === ws) { setStatus("Stream closed, reconnecting…", "error"); reconnect(); }
    };
  });
}

// Stay near the live edge (a stalled tab would otherwise fall behind) and drop old data.
function keepLive(buffer) {
  const ranges = video.buffered;
  if (!ranges.length) return;
  const end = ranges.end(ranges.length - 1);
  if (end - video.currentTime > 1.0) video.currentTime = end - 0.15;
  if (video.paused && !video.muted) playVideo();
  const start = ranges.start(0);
  if (video.currentTime - start > 20 && !buffer.updating) buffer.remove(start, video.currentTime - 10);
}

function closeMSE() {
  const ws = live.ws;
  live.ws = null;
  if (ws) ws.close();
}

// ---- events: state, transcript, errors -----------------------------------------------------

function openEvents() {
  if (live.events) live.events.close();
  const ws = new WebSocket(wsUrl(sessionPath("/events")));
  live.events = ws;
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "state") {
      setStatus(message.state === "speaking" ? "Speaking" : "Idle", "ok");
    } else if (message.type === "utterance" && message.event === "started" && message.text) {
      addLine("avatar", message.text, message.utterance_id);
    } else if (message.type === "utterance" && message.event === "ended" && message.interrupted) {
      const line = document.querySelector(`[data-utterance="${message.utterance_id}"]`);
      if (line) line.classList.add("interrupted");
    } else if (message.type === "error") {
      showError(message.message);
    }
  };
  ws.onclose = () => {
    if (live.events === ws) { live.events = null; live.ready = false; }
  };
}

function addLine(who, text, utteranceId) {
  const item = document.createElement("li");
  item.className = who;
  item.textContent = text;
  if (utteranceId) item.dataset.utterance = utteranceId;
  $("transcript").append(item);
  item.scrollIntoView({ block: "nearest" });
}

// ---- controls ------------------------------------------------------------------------------

function reconnect() {
  closeWebRTC();
  closeMSE();
  if (live.events) { const ws = live.events; live.events = null; ws.close(); }
  live.ready = false; // the health loop starts again once the server answers
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  $("text").value = "";
  addLine("user", text);
  try {
    await call("POST", sessionPath($("llm").checked ? "/chat" : "/say"), { text });
    showError("");
  } catch (err) {
    showError(err.message);
  }
});

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value;
  $("token").value = "";
  try {
    await call("POST", "/auth", { token });
    $("login").hidden = true;
    showError("");
    live.ready = false; // the health loop starts the stream with the cookie
  } catch (err) {
    showError(`Login failed: ${err.message}`);
  }
});

$("interrupt").addEventListener("click", async () => {
  try { await call("POST", sessionPath("/interrupt")); } catch (err) { showError(err.message); }
});

$("unmute").addEventListener("click", () => {
  video.muted = false;
  playVideo();
});
video.addEventListener("volumechange", () => { $("unmute").hidden = !video.muted; });

async function startMic() {
  if (!live.micSender) { showError("the microphone needs a WebRTC connection"); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    live.micTrack = stream.getAudioTracks()[0];
    await live.micSender.replaceTrack(live.micTrack);
    $("mic").setAttribute("aria-pressed", "true");
  } catch (err) {
    showError(`Microphone: ${err.message}`);
  }
}

function stopMic() {
  if (live.micSender && live.micTrack) live.micSender.replaceTrack(null).catch(() => {});
  if (live.micTrack) live.micTrack.stop();
  live.micTrack = null;
  $("mic").setAttribute("aria-pressed", "false");
}

$("mic").addEventListener("click", () => (live.micTrack ? stopMic() : startMic()));

function switchSession(session, avatar) {
  reconnect();
  live.session = session;
  live.avatar = avatar;
  const url = new URL(location.href);
  url.searchParams.set("session", session);
  history.replaceState(null, "", url);
  $("transcript").replaceChildren();
  checkHealth();
}

const newSessionId = () => `s-${Math.random().toString(36).slice(2, 10)}`;

$("new").addEventListener("click", () => switchSession(newSessionId(), $("avatar").value));

// A session keeps its avatar: another avatar is a new session.
$("avatar").addEventListener("change", () => {
  if ($("avatar").value !== live.avatar) switchSession(newSessionId(), $("avatar").value);
});

$("reset").addEventListener("click", async () => {
  const session = live.session;
  reconnect();
  try {
    await call("DELETE", sessionPath("/live")).catch(() => {}); // not live: nothing to stop
    await call("POST", "/reset", { session_id: session });
  } catch (err) {
    showError(err.message);
  }
  switchSession(session, $("avatar").value);
});

window.addEventListener("pagehide", () => { closeWebRTC(); closeMSE(); });

checkHealth();
setInterval(checkHealth, 2000);
