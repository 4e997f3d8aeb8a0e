// lipdub live: one RTCPeerConnection to the server. The page sends an audio track (microphone,
// or a file played into the connection) or none (watching the server's speech), and shows the
// avatar's video with the returned audio. Timing comes from the server (/api/stats) and from the
// browser's own receive statistics.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("avatar");
let pc = null, session = null, audioContext = null, micStream = null, statsTimer = null;
let presented = [];  // [performance.now(), presentedFrames] per video frame callback

function setState(state, message = "") {
  const el = $("state");
  el.textContent = state;
  el.className = "status " + (state === "live" ? "live" : state === "failed" ? "failed" : "");
  $("message").textContent = message;
}

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  $("server-info").textContent = `avatar ${info.width}x${info.height}, ${info.frames} frame(s), ${info.fps} fps, ` +
    `${info.precision}, ${info.threads} thread(s); mouth look-ahead ${info.mouth_lookahead_ms} ms`;
  video.width = info.width;
  video.height = info.height;
}

function waitForIce(connection) {
  if (connection.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (connection.iceGatheringState === "complete") {
        connection.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    connection.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 2000);  // use what was gathered (host candidates come first)
  });
}

async function start(source, file) {
  await stop();
  setState("connecting");
  pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  let playFile = null;
  if (source === "mic") {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
    pc.addTrack(micStream.getAudioTracks()[0], micStream);
    $("play-audio").checked = false;
  } else if (source === "file") {
    audioContext = new AudioContext();
    const buffer = await audioContext.decodeAudioData(await file.arrayBuffer());
    const destination = audioContext.createMediaStreamDestination();
    // A silent source keeps the track sending after the file ends: the server's clock is the
    // audio's, so without it the picture would stop instead of resting.
    const hold = audioContext.createConstantSource();
    hold.offset.value = 0;
    hold.connect(destination);
    hold.start();
    const node = audioContext.createBufferSource();
    node.buffer = buffer;
    node.connect(destination);
    node.onended = () => $("message").textContent = "file finished; the avatar rests";
    pc.addTrack(destination.stream.getAudioTracks()[0], destination.stream);
    playFile = () => node.start();
    $("play-audio").checked = true;
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
    $("play-audio").checked = true;
  }
  video.muted = !$("play-audio").checked;
  const remote = new MediaStream();
  pc.addEventListener("track", (event) => {
    remote.addTrack(event.track);
    video.srcObject = remote;
  });
  pc.addEventListener("connectionstatechange", () => {
    if (!pc) return;
    if (pc.connectionState === "connected") {
      setState("live", source === "server" ? "speaking what the server is sent" : "");
      if (playFile) { playFile(); playFile = null; }
    } else if (["failed", "closed"].includes(pc.connectionState)) {
      setState("failed", "connection " + pc.connectionState);
    }
  });
  await pc.setLocalDescription(await pc.createOffer());
  await waitForIce(pc);
  const response = await fetch("/api/offer", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, source }),
  });
  if (!response.ok) {
    const detail = (await response.json().catch(() => ({}))).detail || response.statusText;
    setState("failed", detail);
    await stop(false);
    return;
  }
  const answer = await response.json();
  session = answer.session;
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  $("stop").disabled = false;
  statsTimer = setInterval(updateStats, 1000);
}

async function stop(reset = true) {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  if (session) fetch(`/api/sessions/${session}`, { method: "DELETE" }).catch(() => {});
  session = null;
  if (pc) pc.close();
  pc = null;
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  micStream = null;
  if (audioContext) audioContext.close();
  audioContext = null;
  video.srcObject = null;
  $("stop").disabled = true;
  if (reset) setState("idle");
}

function onFrame(now, metadata) {
  presented.push([now, metadata.presentedFrames]);
  if (presented.length > 200) presented.shift();
  $("frames").textContent = metadata.presentedFrames;
  video.requestVideoFrameCallback(onFrame);
}

async function updateStats() {
  const recent = presented.filter(([t]) => t >= performance.now() - 3000);
  if (recent.length > 1) {
    const [t0, n0] = recent[0], [t1, n1] = recent[recent.length - 1];
    $("fps").textContent = ((n1 - n0) / ((t1 - t0) / 1000)).toFixed(1);
  }
  if (video.videoWidth) $("size").textContent = `${video.videoWidth}x${video.videoHeight}`;
  try {
    const all = await (await fetch(`/api/stats?session=${session || ""}`)).json();
    const s = all[session] || all.server;
    if (s) {
      if (s.fps) $("server-fps").textContent = s.fps.toFixed(1);
      $("dropped").textContent = `${s.held || 0} / ${s.dropped}`;
      if (s.latency_ms) {
        $("latency").textContent = `${s.latency_ms.p50} / ${s.latency_ms.p90} ms`;
        $("split").textContent = `${s.lookahead_ms.p50} / ${s.work_ms.p50} ms`;
      }
    }
  } catch (e) { /* the server went away: the connection state says so */ }
  if (pc) {
    const report = await pc.getStats();
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video" && r.jitterBufferEmittedCount) {
        const jitter = 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount;
        const decode = r.framesDecoded ? 1000 * r.totalDecodeTime / r.framesDecoded : 0;
        $("jitter").textContent = `${jitter.toFixed(0)} + ${decode.toFixed(1)} ms`;
      }
      if (r.type === "inbound-rtp" && r.kind === "audio" && r.jitterBufferEmittedCount) {
        $("audio-jitter").textContent = `${(1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount).toFixed(0)} ms`;
      }
    });
  }
}

$("start-mic").addEventListener("click", () => start("mic").catch((e) => setState("failed", String(e))));
$("start-server").addEventListener("click", () => start("server").catch((e) => setState("failed", String(e))));
$("audio-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) start("file", file).catch((e) => setState("failed", String(e)));
});
$("stop").addEventListener("click", () => stop());
$("play-audio").addEventListener("change", () => { video.muted = !$("play-audio").checked; });
video.requestVideoFrameCallback(onFrame);
// For scripts driving the page (tests, monitoring): the connection's statistics and its session.
window.lipdubLive = { stats: () => (pc ? pc.getStats() : Promise.resolve(new Map())), session: () => session };
loadInfo().catch((e) => setState("failed", "cannot reach the server: " + e));
