// Minimal client: POST /speak (or /chat + polling /status), then play the new clip.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video");
const statusLine = $("status");
const tokenBox = $("token");

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function headers(json) {
  return json ? { "Content-Type": "application/json" } : {};
}

// The token is sent once to POST /auth, which sets an HttpOnly cookie: the page never
// stores it, and API calls and <video src> (media URLs) are authorised by that cookie.
async function logIn() {
  if (!tokenBox.value) return;
  try {
    await call("POST", "/auth", { token: tokenBox.value });
    setStatus("Logged in.");
    await showAuth();
  } catch (err) {
    setStatus(`Login failed: ${err.message}`, true);
  } finally {
    tokenBox.value = "";
  }
}
tokenBox.addEventListener("change", logIn);

async function showAuth() {
  const auth = await call("GET", "/auth");
  tokenBox.placeholder = !auth.required ? "not required" : auth.authenticated ? "logged in" : "required";
}

async function call(method, url, body) {
  const response = await fetch(url, {
    method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = data && data.message ? data.message : `HTTP ${response.status}`;
    throw new Error(data && data.hint ? `${message} (${data.hint})` : message);
  }
  return data;
}

// Browsers refuse to start unmuted playback without a recent user gesture: fall back
// to muted playback and offer a button that unmutes (a gesture of its own).
async function play(url) {
  video.src = url;
  video.muted = false;
  try {
    await video.play();
    $("unmute").style.display = "none";
  } catch (err) {
    if (err.name !== "NotAllowedError") throw err;
    video.muted = true;
    $("unmute").style.display = "inline-block";
    await video.play().catch(() => setStatus("Press play to watch the clip."));
  }
}

$("unmute").addEventListener("click", () => {
  video.muted = false;
  video.play();
  $("unmute").style.display = "none";
});

function sessionId() {
  return $("session").value.trim() || undefined;
}

async function viaChat(text) {
  let job = await call("POST", "/chat", { text, session_id: sessionId() });
  while (job.status === "queued" || job.status === "running") {
    setStatus(`Rendering the reply… (${job.status})`);
    await new Promise((resolve) => setTimeout(resolve, 500));
    job = await call("GET", `/status/${job.job_id}`);
  }
  if (job.status === "error") throw new Error(job.error ? job.error.message : "the job failed");
  return job.result;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  $("speak").disabled = true;
  setStatus("Rendering…");
  try {
    const result = $("chat").checked ? await viaChat(text) : await call("POST", "/speak", { text, session_id: sessionId() });
    await play(result.clip_url);
    const t = result.timings;
    setStatus(`Clip ${result.clip_index}: ${result.duration.toFixed(2)} s, rendered in ${t.total.toFixed(2)} s.`);
    const item = document.createElement("li");
    item.textContent = text;
    $("log").appendChild(item);
    $("download").href = result.download_url;
  } catch (err) {
    setStatus(`Error: ${err.message}`, true);
  } finally {
    $("speak").disabled = false;
  }
});

async function checkHealth() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    if (health.ready) {
      $("health").textContent = `Ready: ${health.renderer} on ${health.device}, avatars ${health.avatars.join(", ")}.`;
      return;
    }
    $("health").textContent = health.error ? `Server failed to start: ${health.error.message}` : "Loading models…";
    if (!health.error) setTimeout(checkHealth, 1000);
  } catch (err) {
    $("health").textContent = "Server unreachable.";
    setTimeout(checkHealth, 2000);
  }
}
checkHealth();
showAuth().catch(() => {});
