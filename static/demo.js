// The demo page: one Socket.IO connection, its state, and every event it receives.
(function () {
  "use strict";

  const LOG_LIMIT = 200; // a flood must not freeze the tab
  const script = document.getElementById("demo-script");
  const loggedIn = script.dataset.loggedIn === "true";
  const $ = (id) => document.getElementById(id);
  const badge = $("badge");
  const logList = $("log");
  let received = 0;
  let recovering = false; // between a recovered connect and its `recovered` count

  function setState(state, detail) {
    badge.textContent = detail ? state + " · " + detail : state;
    badge.className = "badge badge-" + state;
    document.body.dataset.connection = state;
  }

  function addEntry(event, data, kind) {
    received += 1;
    const item = document.createElement("li");
    item.className = "entry" + (kind ? " entry-" + kind : "");
    item.dataset.event = event;
    const head = document.createElement("div");
    head.className = "entry-head";
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleTimeString([], { hour12: false }) + "." +
      String(now.getMilliseconds()).padStart(3, "0");
    const name = document.createElement("span");
    name.className = "event-name";
    name.textContent = event;
    head.append(time, name);
    const body = document.createElement("pre");
    body.className = "entry-data";
    body.textContent = JSON.stringify(data, null, 2);
    item.append(head, body);
    logList.prepend(item);
    while (logList.childElementCount > LOG_LIMIT) logList.lastElementChild.remove();
    $("log-count").textContent = "(" + received + ")";
  }

  // Fetch a fresh token at every (re)connection attempt: tokens expire, sessions last.
  // `recover: true` opts in to connection state recovery: after a blink the client resumes its
  // session (it adds the session id and last offset itself) and gets what it missed.
  function auth(callback) {
    if (!loggedIn) return callback({ recover: true });
    fetch("/auth/token", { credentials: "same-origin", cache: "no-store" })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("token: HTTP " + r.status))))
      .then((body) => callback({ token: body.token, recover: true }))
      .catch(() => callback({ recover: true }));
  }

  // One line telling how the last reconnection went (recovered, or not).
  function setNotice(text, kind) {
    const notice = $("notice");
    notice.textContent = text || "";
    notice.className = "notice" + (kind ? " notice-" + kind : "");
    notice.hidden = !text;
  }

  function recoveredNotice(missed) {
    setNotice("recovered " + missed + " missed event" + (missed === 1 ? "" : "s"), "ok");
  }

  const socket = io({ auth: auth, transports: ["websocket"], reconnectionDelayMax: 3000 });
  window.demoSocket = socket;

  // --- rooms: the ones this page joined, and who is in each (kept live by `presence` events) ---
  const rooms = new Map(); // room -> Set of user ids
  const roomList = $("rooms");

  function renderRooms() {
    if (!roomList) return;
    roomList.replaceChildren();
    const target = $("room-target");
    const chosen = target.value;
    target.replaceChildren();
    for (const [room, members] of [...rooms.entries()].sort()) {
      const item = document.createElement("li");
      item.className = "room";
      item.dataset.room = room;
      const name = document.createElement("span");
      name.className = "room-name";
      name.textContent = room;
      const who = document.createElement("span");
      who.className = "room-members";
      who.dataset.testid = "members";
      who.textContent = [...members].sort().join(", ") || "…";
      const leave = document.createElement("button");
      leave.type = "button";
      leave.className = "secondary";
      leave.textContent = "Leave";
      leave.setAttribute("aria-label", "Leave " + room);
      leave.addEventListener("click", () => {
        socket.emit("leave", { room: room }, () => { rooms.delete(room); renderRooms(); });
      });
      item.append(name, who, leave);
      roomList.append(item);
      const option = document.createElement("option");
      option.value = option.textContent = room;
      target.append(option);
    }
    if (chosen && rooms.has(chosen)) target.value = chosen;
    $("room-send-form").hidden = rooms.size === 0;
  }

  function joinRoom(room) {
    socket.emit("join", { room: room }, (ack) => {
      if (!ack || !ack.ok) return; // the refusal is shown as an `error` event in the log
      if (!rooms.has(room)) rooms.set(room, new Set());
      socket.emit("who", { room: room }, (answer) => {
        if (!answer || !answer.ok || !rooms.has(room)) return;
        for (const member of answer.members) rooms.get(room).add(member.user_id);
        renderRooms();
      });
      renderRooms();
    });
  }

  socket.on("presence", (data) => {
    const members = data && rooms.get(data.room);
    if (!members) return;
    if (data.status === "join") members.add(data.user);
    else if (data.status === "leave") members.delete(data.user);
    renderRooms();
  });
  // The token runs out soon: reconnect now with a fresh one (the auth callback fetches it).
  socket.on("token_expiring", () => socket.disconnect().connect());

  socket.on("connect", () => {
    setState("connected");
    // A fresh (not recovered) connection is in no room: join this page's rooms again.
    if (!socket.recovered) for (const room of rooms.keys()) joinRoom(room);
    // Recovered: what it missed follows, then `recovered` {missed: N} (none when nothing was missed).
    // Not recovered: a fresh session; a failed recovery is told by `recovery_failed` right after.
    recovering = socket.recovered;
    if (recovering) recoveredNotice(0);
    else setNotice("");
    $("sid").textContent = socket.id;
    socket.emit("whoami", null, (me) => {
      $("server-instance").textContent = me.instance;
      if (loggedIn && me.user_id === null) setState("connected", "anonymous: session expired?");
    });
  });
  socket.on("disconnect", (reason) => {
    $("sid").textContent = "–";
    // The server or a logout ended it: no retry. Anything else: the client retries by itself.
    setState(reason === "io server disconnect" || reason === "io client disconnect" ? "disconnected" : "reconnecting", reason);
  });
  socket.io.on("reconnect_attempt", (attempt) => setState("reconnecting", "attempt " + attempt));
  socket.on("connect_error", (err) => {
    const code = err.data && err.data.code;
    setState(socket.active ? "reconnecting" : "disconnected", code || err.message);
  });
  socket.on("recovered", (data) => {
    if (!recovering) return; // only the server's count right after a recovery (anyone may emit "recovered")
    recovering = false;
    recoveredNotice(data && Number.isInteger(data.missed) ? data.missed : 0);
  });
  socket.on("recovery_failed", (data) => {
    // A real app refetches its state here; the demo has none beyond whoami (asked at every
    // connect), so it says what happened: events missed meanwhile are not coming.
    const reason = (data && data.reason) || "unknown";
    setNotice("could not recover (" + reason + "): events missed meanwhile are lost", "warn");
  });
  // Every event carries one data argument; a recoverable socket's also carry their offset
  // (a string) as a last argument, which is the client's business, not data to show.
  socket.onAny((event, data) => addEntry(event, data));

  const sendForm = $("send-form");
  if (sendForm) {
    sendForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("message");
      const text = input.value.trim();
      if (!text) return;
      socket.emit("events", { text: text, sent_at: new Date().toISOString() });
      input.value = "";
      input.focus();
    });
  }
  const joinForm = $("join-form");
  if (joinForm) {
    joinForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("room-name");
      const name = input.value.trim();
      if (name) joinRoom("public:" + name);
      input.value = "";
    });
    $("room-send-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("room-message");
      const text = input.value.trim();
      if (!text) return;
      socket.emit("room_send", { room: $("room-target").value, text: text });
      input.value = "";
    });
  }
  const logoutForm = $("logout-form");
  if (logoutForm) {
    // Close the socket before the session ends, so nothing for this user arrives afterwards.
    logoutForm.addEventListener("submit", () => socket.disconnect());
  }
  $("clear-log").addEventListener("click", () => {
    logList.replaceChildren();
    received = 0;
    $("log-count").textContent = "(0)";
  });
  setState("disconnected", "connecting");
})();
