// The bench's Node reference: Socket.IO 4 with the Redis adapter, serving our interface.
//
// Why: the issue measures us against a Node Socket.IO app on the same machine, in the same run,
// not against a figure quoted from elsewhere. This is the smallest such app that the bench's load
// generator can drive exactly as it drives ours: the same tokens (itsdangerous, HMAC-SHA256, our
// salt), the same REST hooks and API keys, the same `events` gateway. Propagation is the stock
// Redis adapter (one pattern subscription that every instance reads), as a NestJS gateway on
// `@socket.io/redis-adapter` would deploy it.
//
// Usage (the bench starts it): PORT=8000 REDIS_URL=redis://... SECRET_KEY=... API_KEYS=k1,k2
//   CHANNEL_PREFIX=p INSTANCE_ID=node-0 node bench/reference/server.mjs
// It is a yardstick, not a product: no recovery, rooms only as the `join` gateway, no metrics.

import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { inflateSync } from "node:zlib";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";
import { Server } from "socket.io";

const env = process.env;
const port = Number(env.PORT ?? 8000);
const prefix = env.CHANNEL_PREFIX ?? "webapp";
const instance = env.INSTANCE_ID ?? `node-${process.pid}`;
const maxBody = Number(env.MAX_PAYLOAD_BYTES ?? 65536);
const secret = (env.SECRET_KEYS ?? env.SECRET_KEY ?? "").split(",")[0].trim();
const apiKeys = (env.API_KEYS ?? "").split(",").map((k) => k.trim()).filter(Boolean).map((k) => Buffer.from(k));
if (!secret || !env.REDIS_URL) {
  process.stderr.write("reference: SECRET_KEY and REDIS_URL are required\n");
  process.exit(2);
}

// --- tokens: itsdangerous URLSafeSerializer, salt "webapp.socket-token.v1", HMAC-SHA256 ------------
// itsdangerous derives the HMAC key as sha256(salt + "signer" + secret) ("django-concat").
const signingKey = createHash("sha256").update("webapp.socket-token.v1" + "signer" + secret).digest();
const USER_ID = /^[A-Za-z0-9_.@-]{1,128}$/;

function sign(value) {
  return createHmac("sha256", signingKey).update(value).digest("base64url");
}

function verify(token) {
  if (typeof token !== "string" || token.length === 0 || token.length > 1024) return null;
  const cut = token.lastIndexOf(".");
  if (cut <= 0) return null;
  const value = token.slice(0, cut);
  const given = Buffer.from(token.slice(cut + 1));
  const wanted = Buffer.from(sign(value));
  if (given.length !== wanted.length || !timingSafeEqual(given, wanted)) return null;
  try {
    const compressed = value.startsWith(".");
    let json = Buffer.from(compressed ? value.slice(1) : value, "base64url");
    if (compressed) json = inflateSync(json);
    const claims = JSON.parse(json.toString("utf8"));
    if (!USER_ID.test(claims?.sub ?? "") || !Number.isInteger(claims.exp)) return null;
    return claims.exp > Date.now() / 1000 ? claims.sub : null;
  } catch {
    return null;
  }
}

function mint(userId, ttl) {
  const now = Date.now();
  const exp = Math.floor(now / 1000 + ttl);
  const value = Buffer.from(JSON.stringify({ sub: userId, exp, iat: now })).toString("base64url");
  return { token: `${value}.${sign(value)}`, expires_at: new Date(exp * 1000).toISOString().replace(".000Z", "Z") };
}

// --- REST hooks ------------------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

function authorised(req) {
  const header = req.headers.authorization ?? "";
  if (!header.startsWith("Bearer ")) return false;
  const given = Buffer.from(header.slice(7));
  let ok = false;
  for (const key of apiKeys) ok = (key.length === given.length && timingSafeEqual(key, given)) || ok;
  return ok;
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on("data", (chunk) => {
      size += chunk.length;
      if (size > maxBody) {
        reject(new HttpError(413, "payload_too_large", `bodies are limited to ${maxBody} bytes`));
        req.destroy();
      } else chunks.push(chunk);
    });
    req.on("end", () => {
      try {
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        if (body === null || typeof body !== "object" || Array.isArray(body)) throw new Error("not an object");
        resolve(body);
      } catch {
        reject(new HttpError(400, "malformed_json", "the body is not a JSON object"));
      }
    });
    req.on("error", reject);
  });
}

function emitBody(body) {
  if (typeof body.event !== "string" || body.event.length === 0 || body.event.length > 64) {
    throw new HttpError(422, "invalid_fields", "event: a string of 1-64 characters");
  }
  return [body.event, body.data ?? null];
}

let accepted = 0;
function accept(res, scope) {
  send(res, 202, { accepted: true, id: `${instance}-${++accepted}`, scope });
}

let ready = false;
const routes = {
  "GET /healthz": (req, res) => send(res, 200, { status: "ok", instance }),
  "GET /readyz": (req, res) => send(res, ready ? 200 : 503, { ready, instance, sockets: io.engine.clientsCount }),
  "POST /api/tokens": async (req, res, body) => {
    if (!USER_ID.test(body.user_id ?? "")) throw new HttpError(422, "invalid_fields", "user_id");
    send(res, 201, mint(body.user_id, Number.isInteger(body.ttl) ? body.ttl : 3600));
  },
  "POST /api/emit/all": async (req, res, body) => {
    io.emit(...emitBody(body));
    accept(res, "all");
  },
  "POST /api/emit/authenticated": async (req, res, body) => {
    io.to("authenticated").emit(...emitBody(body));
    accept(res, "authenticated");
  },
  "POST /api/emit/users": async (req, res, body) => {
    const users = body.user_ids;
    if (!Array.isArray(users) || users.length === 0 || users.length > 1000 || !users.every((u) => USER_ID.test(u))) {
      throw new HttpError(422, "invalid_fields", "user_ids: 1-1000 user ids");
    }
    // One publish for every user: the adapter sends each socket one copy however many rooms match.
    io.to(users.map((u) => `user:${u}`)).emit(...emitBody(body));
    accept(res, "user");
  },
};

async function handle(req, res) {
  const path = req.url.split("?")[0];
  try {
    let route = routes[`${req.method} ${path}`];
    if (!route && req.method === "POST" && path.startsWith("/api/emit/users/")) {
      const user = decodeURIComponent(path.slice("/api/emit/users/".length));
      route = async (req, res, body) => {
        if (!USER_ID.test(user)) throw new HttpError(422, "invalid_fields", "user_id");
        io.to(`user:${user}`).emit(...emitBody(body));
        accept(res, "user");
      };
    } else if (!route && req.method === "POST" && path.startsWith("/api/emit/rooms/")) {
      const room = decodeURIComponent(path.slice("/api/emit/rooms/".length));
      route = async (req, res, body) => {
        if (room.length === 0 || room.length > 128) throw new HttpError(422, "invalid_fields", "room");
        io.to(room).emit(...emitBody(body));
        accept(res, "room");
      };
    }
    if (!route) throw new HttpError(404, "not_found", "no such route");
    if (path.startsWith("/api/") && !authorised(req)) {
      throw new HttpError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'");
    }
    await route(req, res, req.method === "POST" ? await readJson(req) : null);
  } catch (err) {
    if (!(err instanceof HttpError)) process.stderr.write(`reference: ${err?.stack ?? err}\n`);
    const status = err instanceof HttpError ? err.status : 500;
    if (!res.headersSent) send(res, status, { error: err?.code ?? "internal", message: String(err?.message ?? err) });
  }
}

// --- Socket.IO -------------------------------------------------------------------------------------
const http = createServer((req, res) => {
  if (!req.url.startsWith("/socket.io/")) handle(req, res);
});
const io = new Server(http, { maxHttpBufferSize: maxBody, serveClient: false });

io.use((socket, next) => {
  const token = socket.handshake.auth?.token;
  if (token == null) return next(); // anonymous: reaches `all` only
  const user = verify(String(token));
  if (user === null) {
    const err = new Error("invalid token");
    err.data = { code: "invalid_token" };
    return next(err);
  }
  socket.data.user = user;
  socket.join(["authenticated", `user:${user}`]);
  next();
});

io.on("connection", (socket) => {
  socket.on("events", (data, ack) => {
    socket.emit("events", data);
    const user = socket.data.user;
    if (user) socket.to(`user:${user}`).emit("events", data); // the user's other sockets, not the asker
    if (typeof ack === "function") ack({ ok: true, answers: 1 });
  });
  socket.on("join", (data, ack) => {
    const room = data?.room;
    const ok = Boolean(socket.data.user) && typeof room === "string" && room.length > 0 && room.length <= 128;
    if (ok) socket.join(room);
    if (typeof ack === "function") ack(ok ? { ok: true, room } : { ok: false, error: "forbidden" });
  });
});

const pub = createClient({ url: env.REDIS_URL });
const sub = pub.duplicate();
for (const client of [pub, sub]) client.on("error", (err) => process.stderr.write(`reference: redis: ${err}\n`));
await Promise.all([pub.connect(), sub.connect()]);
io.adapter(createAdapter(pub, sub, { key: prefix }));
http.listen(port, "127.0.0.1", () => {
  ready = true;
  process.stdout.write(`reference ${instance} listening on 127.0.0.1:${port}\n`);
});

function stop() {
  io.close();
  Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
