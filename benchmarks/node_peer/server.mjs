// The Node.js peer of the benchmark harness: what a competent team would write
// with `ws` and `ioredis` to do wsbroker's job for the load generator.
//
// It verifies the HS256 token at the upgrade (jsonwebtoken; header or query), greets with a
// welcome, confirms subscribes only after Redis has (as wsbroker does), checks
// that each Redis payload is JSON, builds the message once per Redis message
// and sends it to every local subscriber with ws.send, and cuts a client with
// more than 1 MiB unsent (wsbroker's default slow-consumer limit).
//
//   node server.mjs --port P --redis-url redis://127.0.0.1:6379 --secret S
import http from "node:http";
import { parseArgs } from "node:util";
import Redis from "ioredis";
import jwt from "jsonwebtoken";
import { WebSocketServer } from "ws";

const { values: args } = parseArgs({
  options: {
    port: { type: "string" },
    "redis-url": { type: "string" },
    secret: { type: "string" },
    prefix: { type: "string", default: "ws:" },
  },
});
const PREFIX = args.prefix;
const MAX_SEND_BUFFER = 1024 * 1024;

const subscriber = new Redis(args["redis-url"], { lazyConnect: false });
const channels = new Map(); // channel -> Set<WebSocket>
const pending = new Map(); // channel -> Promise of the Redis subscription

subscriber.on("messageBuffer", (redisChannel, payload) => {
  const channel = redisChannel.toString("latin1").slice(PREFIX.length);
  const sockets = channels.get(channel);
  if (!sockets || sockets.size === 0) return;
  try {
    JSON.parse(payload);
  } catch {
    return; // not JSON: dropped, as wsbroker does
  }
  const frame = Buffer.concat([
    Buffer.from(`{"type":"message","channel":${JSON.stringify(channel)},"data":`),
    payload,
    Buffer.from("}"),
  ]);
  for (const ws of sockets) {
    if (ws.bufferedAmount > MAX_SEND_BUFFER) {
      ws.terminate();
      continue;
    }
    ws.send(frame, { binary: false });
  }
});

function allowed(patterns, channel) {
  if (!Array.isArray(patterns)) return false;
  const parts = channel.split(".");
  return patterns.some((pattern) => {
    const want = pattern.split(".");
    for (let i = 0; i < want.length; i++) {
      if (want[i] === ">") return i < parts.length;
      if (i >= parts.length || (want[i] !== "*" && want[i] !== parts[i])) return false;
    }
    return want.length === parts.length;
  });
}

async function subscribe(channel, ws) {
  let sockets = channels.get(channel);
  if (!sockets) {
    sockets = new Set();
    channels.set(channel, sockets);
    pending.set(channel, subscriber.subscribe(PREFIX + channel));
  }
  await pending.get(channel);
  sockets.add(ws);
}

const server = http.createServer((req, res) => {
  res.writeHead(404).end();
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 65536 });

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://localhost");
  const bearer = /^Bearer (.+)$/i.exec(req.headers.authorization ?? "");
  const token = bearer ? bearer[1] : url.searchParams.get("token") ?? "";
  let claims;
  try {
    claims = jwt.verify(token, args.secret, { algorithms: ["HS256"] });
  } catch (error) {
    socket.end(`HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\n\r\n${error.message}\n`);
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => serveClient(ws, claims));
});

let clientIds = 0;
function serveClient(ws, claims) {
  const mine = new Set();
  ws.send(JSON.stringify({ type: "welcome", client: String(++clientIds), user: claims.sub,
    node: "node-peer", expires: claims.exp }));
  ws.on("message", async (raw, isBinary) => {
    if (isBinary) return ws.close(1003);
    let op;
    try {
      op = JSON.parse(raw);
    } catch {
      return ws.send(JSON.stringify({ type: "error", code: "bad_request", message: "not JSON" }));
    }
    if (op.op === "subscribe" && typeof op.channel === "string") {
      if (!allowed(claims.channels, op.channel)) {
        return ws.send(JSON.stringify({ type: "error", id: op.id, code: "forbidden" }));
      }
      await subscribe(op.channel, ws);
      mine.add(op.channel);
      ws.send(JSON.stringify({ type: "ok", id: op.id, channel: op.channel }));
    } else if (op.op === "ping") {
      ws.send(JSON.stringify({ type: "ok", id: op.id }));
    }
  });
  ws.on("close", () => {
    for (const channel of mine) channels.get(channel)?.delete(ws);
  });
}

server.listen(Number(args.port), "127.0.0.1");
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
