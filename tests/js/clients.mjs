// Official Socket.IO JavaScript clients (socket.io-client 4.x) driven by tests/jsclient.py.
//
// Why: connection state recovery is implemented by the JavaScript client (it remembers the session id and
// the last offset it saw, and sends them back on reconnection); python-socketio's client does not do it,
// so only the real thing tells whether our server recovers.
//
// Usage: node clients.mjs '{"url": "http://127.0.0.1:PORT", "clients": [{"name": "c1", "token": null,
//                           "recover": true, "transports": ["websocket"]}]}'
// Stdout: one JSON object per line, always with "client" (a name, or null) and "t" (Date.now()).
// Stdin: one JSON command per line: {"cmd": "emit", "client": NAME, "event": E, "data": D} or {"cmd": "close"}.
// Exits 0 on "close" or when stdin closes; exits 2 on a malformed config or command (a bug in the test).

import { createInterface } from "node:readline";
import { io } from "socket.io-client";

function out(client, record) {
  // stdout is a pipe: writes are synchronous on Linux, so nothing is lost when we exit
  process.stdout.write(JSON.stringify({ client, t: Date.now(), ...record }) + "\n");
}

function fail(message) {
  process.stderr.write(`clients.mjs: ${message}\n`);
  process.exit(2);
}

let config;
try {
  config = JSON.parse(process.argv[2] ?? "");
} catch (err) {
  fail(`argv[2] must be the JSON config: ${err.message}`);
}
if (typeof config.url !== "string" || !Array.isArray(config.clients) || config.clients.length === 0) {
  fail('config needs "url" (a string) and "clients" (a non-empty list)');
}

const sockets = new Map();
const connectedOnce = new Set();

for (const spec of config.clients) {
  const { name, token = null, recover = false, transports = ["websocket"] } = spec;
  if (typeof name !== "string" || sockets.has(name)) fail(`each client needs a unique "name", got ${JSON.stringify(name)}`);
  // recover false means the key is absent, as a client that knows nothing of recovery would send it
  const extra = recover ? { recover } : {};
  const socket = io(config.url, {
    forceNew: true, // one Manager (one Engine.IO connection) per client, never multiplexed
    transports,
    // called at every (re)connection attempt
    auth: (cb) => cb(token ? { token, ...extra } : { ...extra }),
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    randomizationFactor: 0.2,
    timeout: 5000,
  });
  sockets.set(name, socket);

  socket.on("connect", () => {
    // recovered is undefined (not false) when the server offers no recovery: always say true or false
    out(name, { type: "connect", id: socket.id, recovered: socket.recovered === true });
    if (!connectedOnce.has(name)) {
      connectedOnce.add(name);
      if (connectedOnce.size === sockets.size && sockets.size === config.clients.length) {
        out(null, { type: "ready" });
      }
    }
  });
  socket.onAny((event, ...args) => out(name, { type: "event", event, args }));
  socket.on("disconnect", (reason) => out(name, { type: "disconnect", reason }));
  socket.on("connect_error", (err) => out(name, { type: "connect_error", message: err.message, data: err.data ?? null }));
}

let closing = false;
function shutdown() {
  if (closing) return;
  closing = true;
  for (const socket of sockets.values()) socket.close();
  commands.close();
  process.stdin.destroy();
  // leave when nothing is pending any more (close frames flushed), or after 500 ms whatever happens
  setTimeout(() => process.exit(0), 500).unref();
}

const commands = createInterface({ input: process.stdin, crlfDelay: Infinity });
commands.on("line", (line) => {
  if (closing || line.trim() === "") return;
  let command;
  try {
    command = JSON.parse(line);
  } catch (err) {
    fail(`a command must be one JSON object per line: ${err.message}: ${line}`);
  }
  if (command.cmd === "close") {
    shutdown();
  } else if (command.cmd === "emit") {
    const socket = sockets.get(command.client);
    if (socket === undefined) fail(`no client named ${JSON.stringify(command.client)}`);
    if (typeof command.event !== "string") fail(`emit needs an "event" string: ${line}`);
    if ("data" in command) socket.emit(command.event, command.data);
    else socket.emit(command.event);
  } else {
    fail(`unknown command: ${line}`);
  }
});
commands.on("close", shutdown); // stdin closed: our parent is gone or done
process.on("SIGTERM", shutdown);
