/**
 * wsbroker.js: the browser client of wsbroker (SPEC §14). One ES module, no
 * dependencies; every node serves it at /wsbroker.js, types at /wsbroker.d.ts.
 *
 *   import { WsBroker } from "/wsbroker.js";
 *   const client = new WsBroker("wss://host/ws", { getToken });
 *   client.connect();
 *   client.subscribe("chat.room1", { recover: true }).on("message", show);
 *
 * The rules that make it survive real networks, each in one place:
 * - One socket at a time: every callback of an old socket is detached before a
 *   new one opens, so a late event of a dead connection changes nothing.
 * - Subscriptions are objects that outlive connections, one per channel; a
 *   reconnect resubscribes each once, and a handler added twice runs once.
 * - One getToken call at a time: a refresh and a reconnect that both need a
 *   token share the same call, and its token is the one both use.
 * - Reconnects wait a full-jitter backoff (random between 0 and
 *   min(maxReconnectDelay, minReconnectDelay * 2^failures)), reset only once a
 *   connection has stayed up a while, so a fleet restart is no storm.
 * - Liveness does not trust the browser: a silent connection gets a `ping`, and
 *   no answer within pingTimeout means dead; `online` and a tab becoming
 *   visible (where timers were throttled) check at once.
 */

const DEFAULTS = {
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  pingInterval: 25000,
  pingTimeout: 10000,
};

/** Close codes of the "do not reconnect blindly" band (SPEC §8), by error code. */
const STOP_CODES = new Map([[1003, "unsupported_data"], [1009, "message_too_big"],
                            [4008, "rate_limited"]]);
/** Close codes after which only a fresh token helps (SPEC §8). */
const TOKEN_CODES = new Set([4001, 4003]);
/** Subscribe errors worth retrying on the same connection. */
const RETRY_SUBSCRIBE = new Set(["unavailable", "rate_limited"]);
/** A connection that stayed up this long resets the reconnect backoff. */
const STABLE_MS = 5000;

/** An error with the server's error `code` ("disconnected" when the connection went first). */
export class WsBrokerError extends Error {
  constructor(code, message, closeCode) {
    super(message);
    this.name = "WsBrokerError";
    this.code = code;
    if (closeCode !== undefined) this.closeCode = closeCode;
  }
}

class Emitter {
  #handlers = new Map();

  /** Adds a handler (once, however often it is added); returns a function that removes it. */
  on(event, handler) {
    let handlers = this.#handlers.get(event);
    if (!handlers) this.#handlers.set(event, (handlers = new Set()));
    handlers.add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this.#handlers.get(event)?.delete(handler);
  }

  _emit(event, value) {
    const handlers = this.#handlers.get(event);
    if (!handlers) return;
    for (const handler of [...handlers]) {
      try {
        handler(value);
      } catch (error) {
        // A failing handler must not break the client's own bookkeeping:
        // report it to the page (window.onerror) outside this call.
        queueMicrotask(() => { throw error; });
      }
    }
  }
}

/** One channel's subscription; the same object for the life of the client. */
export class Subscription extends Emitter {
  constructor(client, channel) {
    super();
    this.channel = channel;
    this.state = "unsubscribed";
    this.recover = false;
    /** The last offset delivered to the application, and its epoch (history channels). */
    this.offset = undefined;
    this.epoch = undefined;
    this._client = client;
    this._attempt = 0;
    this._failures = 0;
  }

  unsubscribe() {
    this._client._unsubscribe(this);
  }

  _deliver(frame) {
    if (this.state === "unsubscribed") return;
    const { offset } = frame;
    if (offset !== undefined) {
      if (frame.epoch !== undefined && frame.epoch !== this.epoch) {
        this.epoch = frame.epoch;
      } else if (this.offset !== undefined && offset <= this.offset) {
        return; // delivered already: recovery overlapped live delivery
      }
      this.offset = offset;
    }
    this._emit("message", { channel: this.channel, data: frame.data, from: frame.from, offset });
  }
}

export class WsBroker extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.state = "disconnected";
    /** The welcome of the current connection: client, user, node, expires. */
    this.welcome = null;
    this._options = { ...DEFAULTS };
    for (const key of Object.keys(DEFAULTS)) {
      if (options[key] !== undefined) this._options[key] = options[key];
    }
    this._token = options.token || null;
    this._getToken = options.getToken || null;
    this._tokenStale = false;
    this._expires = 0;
    this._fetching = null;
    this._subs = new Map();
    this._pending = new Map();
    this._queue = [];
    this._nextId = 1;
    this._ws = null;
    this._attempt = 0;
    this._failures = 0;
    this._connectedAt = 0;
    this._lastReceived = 0;
    this._pingSent = 0;
    this._reconnectTimer = 0;
    this._refreshTimer = 0;
    this._livenessTimer = 0;
    this._wake = () => this._checkNow();
    this._visible = () => {
      if (globalThis.document?.visibilityState !== "hidden") this._checkNow();
    };
  }

  // -- connection -------------------------------------------------------------

  connect() {
    if (this.state !== "disconnected") return;
    this._listen(true);
    this._failures = 0;
    this._setState("connecting");
    this._open();
  }

  disconnect() {
    if (this.state === "disconnected") return;
    this._attempt++;
    this._drop();
    this._listen(false);
    this._setState("disconnected", { code: 1000, reason: "disconnect() called" });
  }

  async _open() {
    const attempt = ++this._attempt;
    let token;
    try {
      token = await this._currentToken();
    } catch (error) {
      if (attempt !== this._attempt) return;
      if (error instanceof WsBrokerError) return this._stop(error);
      this._emit("error", new WsBrokerError("token_failed", `getToken failed: ${error}`));
      return this._retry();
    }
    if (attempt !== this._attempt) return; // disconnect() or another attempt came first
    if (!token) {
      return this._stop(new WsBrokerError("unauthorized", "no token: pass token or getToken"));
    }
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      return this._stop(new WsBrokerError("bad_url", String(error)));
    }
    this._ws = ws;
    ws.onopen = () => ws.send(JSON.stringify({ op: "auth", token }));
    ws.onmessage = (event) => this._receive(ws, event.data);
    ws.onclose = (event) => this._closed(ws, event.code, event.reason);
    // No welcome within pingTimeout (a hung proxy, a stopped node): try again.
    this._livenessTimer = setTimeout(() => this._abandon("no welcome in time"),
                                     this._options.pingTimeout);
  }

  _receive(ws, text) {
    if (ws !== this._ws) return;
    this._lastReceived = Date.now();
    this._pingSent = 0;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "welcome":
        return this._welcomed(frame);
      case "message":
        return this._subs.get(frame.channel)?._deliver(frame);
      case "unsubscribed": {
        const sub = this._subs.get(frame.channel);
        if (sub && sub.state !== "unsubscribed") this._ended(sub, frame.reason);
        return;
      }
      case "join":
      case "leave": {
        const sub = this._subs.get(frame.channel);
        if (sub && sub.state !== "unsubscribed") sub._emit(frame.type, frame.member);
        return;
      }
      case "ok":
      case "error": {
        const settle = this._pending.get(frame.id);
        if (settle) {
          this._pending.delete(frame.id);
          settle(frame);
        }
      }
    }
  }

  _welcomed(frame) {
    const { type, id, ...welcome } = frame;
    this.welcome = welcome;
    this._expires = welcome.expires;
    this._connectedAt = Date.now();
    this._scheduleRefresh();
    this._scheduleLiveness(this._options.pingInterval);
    // Resubscribe and send queued ops before announcing the state, so that a
    // `state` handler calling subscribe() finds its subscription in flight.
    for (const sub of this._subs.values()) {
      if (sub.state !== "unsubscribed") this._sendSubscribe(sub);
    }
    const queue = this._queue;
    this._queue = [];
    for (const [op, settle] of queue) this._request(op, settle);
    this._setState("connected");
  }

  _closed(ws, code, reason) {
    if (ws !== this._ws) return;
    const stable = this.state === "connected" && Date.now() - this._connectedAt >= STABLE_MS;
    if (stable) this._failures = 0;
    this._drop();
    const detail = { code, reason };
    const stop = STOP_CODES.get(code);
    if (stop) {
      return this._stop(new WsBrokerError(stop, `closed by the server (${code} ${reason})`, code),
                        detail);
    }
    if (TOKEN_CODES.has(code)) {
      if (!this._getToken) {
        return this._stop(new WsBrokerError(
          "unauthorized", `closed by the server (${code} ${reason}); no getToken for a new token`,
          code), detail);
      }
      this._tokenStale = true;
    }
    this._retry(detail);
  }

  /** Give up on the current socket now: a dead one may never fire `close`. */
  _abandon(reason) {
    this._closed(this._ws, 1006, reason);
  }

  _retry(detail) {
    this._setState("connecting", detail);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = 0;
      this._open();
    }, this._backoff(this._failures++));
  }

  /** Full jitter: random between 0 and min(max, min * 2^failures). */
  _backoff(failures) {
    const { minReconnectDelay, maxReconnectDelay } = this._options;
    return Math.random() * Math.min(maxReconnectDelay,
                                    minReconnectDelay * 2 ** Math.min(failures, 30));
  }

  _stop(error, detail) {
    this._attempt++;
    this._drop();
    this._listen(false);
    this._emit("error", error);
    this._setState("disconnected", detail);
  }

  /** Forget the current socket: detach it, close it, fail what waited on it. */
  _drop() {
    const ws = this._ws;
    this._ws = null;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._refreshTimer);
    clearTimeout(this._livenessTimer);
    this._reconnectTimer = 0;
    this._pingSent = 0;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      if (ws.readyState < 2) ws.close(1000);
    }
    const waiting = [...this._pending.values(), ...this._queue.map(([, settle]) => settle)];
    this._pending.clear();
    this._queue = [];
    for (const sub of this._subs.values()) {
      if (sub.state === "subscribed") sub.state = "subscribing";
    }
    for (const settle of waiting) settle(null);
  }

  _setState(state, detail) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    if (state !== "connected") this.welcome = null;
    this._emit("state", { state, previous, ...detail });
  }

  _listen(on) {
    const method = on ? "addEventListener" : "removeEventListener";
    globalThis[method]?.("online", this._wake);
    globalThis.document?.[method]("visibilitychange", this._visible);
  }

  // -- liveness ---------------------------------------------------------------

  _scheduleLiveness(delay) {
    clearTimeout(this._livenessTimer);
    this._livenessTimer = setTimeout(() => this._checkLiveness(), delay);
  }

  _checkLiveness() {
    if (this.state !== "connected") return;
    const { pingInterval, pingTimeout } = this._options;
    const now = Date.now();
    if (this._pingSent) {
      if (now - this._pingSent >= pingTimeout) return this._abandon("no reply to ping");
      return this._scheduleLiveness(this._pingSent + pingTimeout - now);
    }
    const idle = now - this._lastReceived;
    if (idle >= pingInterval) this._ping();
    else this._scheduleLiveness(pingInterval - idle);
  }

  _ping() {
    this._pingSent = Date.now();
    this._ws.send('{"op":"ping"}');
    this._scheduleLiveness(this._options.pingTimeout);
  }

  /** The network came back or the tab became visible: check, or stop waiting. */
  _checkNow() {
    if (this.state === "connected") {
      if (!this._pingSent) this._ping();
    } else if (this.state === "connecting" && this._reconnectTimer) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = 0;
      this._open();
    }
  }

  // -- tokens -----------------------------------------------------------------

  _currentToken() {
    if (this._fetching) return this._fetching;
    const expired = this._expires && Date.now() >= this._expires * 1000;
    if (this._token && !this._tokenStale && !(expired && this._getToken)) return this._token;
    if (!this._getToken) return this._tokenStale ? null : this._token;
    return this._fetchToken();
  }

  /** One getToken call at a time: whoever needs a token meanwhile gets this one. */
  _fetchToken() {
    if (!this._fetching) {
      this._fetching = (async () => {
        try {
          const token = await this._getToken();
          if (typeof token !== "string" || !token) {
            throw new WsBrokerError("unauthorized", "getToken gave no token");
          }
          this._token = token;
          this._tokenStale = false;
          return token;
        } finally {
          this._fetching = null;
        }
      })();
    }
    return this._fetching;
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    if (!this._getToken || !this._expires) return;
    const remaining = this._expires * 1000 - Date.now();
    // Refresh a third of the remaining life early, at most 30 s before expiry.
    const delay = Math.max(0, remaining - Math.min(30000, remaining / 3));
    this._refreshTimer = setTimeout(() => this._refresh(), delay);
  }

  async _refresh() {
    const ws = this._ws;
    let token;
    try {
      token = await this._fetchToken();
    } catch (error) {
      if (ws !== this._ws) return;
      this._emit("error", error instanceof WsBrokerError ? error
        : new WsBrokerError("token_failed", `getToken failed: ${error}`));
      const remaining = this._expires * 1000 - Date.now();
      this._refreshTimer = setTimeout(() => this._refresh(), Math.max(1000, remaining / 2));
      return;
    }
    // A reconnect meanwhile authenticates with this token by itself.
    if (ws !== this._ws || this.state !== "connected") return;
    this._request({ op: "auth", token }, (reply) => {
      if (!reply || ws !== this._ws) return;
      if (reply.type === "ok") {
        this._expires = reply.expires;
        this._scheduleRefresh();
      } else {
        this._emit("error", new WsBrokerError(reply.code, reply.message));
      }
    });
  }

  // -- subscriptions ----------------------------------------------------------

  /** The subscription of `channel` (the same object every time), subscribing if it is not. */
  subscribe(channel, options = {}) {
    let sub = this._subs.get(channel);
    if (!sub) {
      sub = new Subscription(this, channel);
      this._subs.set(channel, sub);
    }
    if (options.recover !== undefined) sub.recover = Boolean(options.recover);
    if (sub.state === "unsubscribed") {
      sub.state = "subscribing";
      sub._failures = 0;
      if (this.state === "connected") this._sendSubscribe(sub);
    }
    return sub;
  }

  _sendSubscribe(sub) {
    sub.state = "subscribing";
    const attempt = ++sub._attempt;
    const op = { op: "subscribe", channel: sub.channel };
    const recovering = sub.recover && sub.epoch !== undefined;
    if (recovering) op.since = { offset: sub.offset ?? 0, epoch: sub.epoch };
    this._request(op, (reply) => {
      if (!reply || attempt !== sub._attempt || sub.state !== "subscribing") return;
      if (reply.type === "error") return this._subscribeFailed(sub, attempt, reply);
      sub.state = "subscribed";
      sub._failures = 0;
      const recovered = recovering && reply.recovered === true;
      if (reply.epoch !== undefined && !recovered) {
        // Not recovered: the application resyncs, and delivery continues after `offset`.
        sub.offset = reply.offset;
        sub.epoch = reply.epoch;
      }
      sub._emit("subscribed", { channel: sub.channel, recovered, offset: reply.offset,
                                epoch: reply.epoch });
    });
  }

  _subscribeFailed(sub, attempt, reply) {
    if (RETRY_SUBSCRIBE.has(reply.code)) {
      const ws = this._ws;
      setTimeout(() => {
        if (ws === this._ws && attempt === sub._attempt && sub.state === "subscribing") {
          this._sendSubscribe(sub);
        }
      }, this._backoff(sub._failures++));
      return;
    }
    sub._emit("error", new WsBrokerError(reply.code, reply.message));
    this._ended(sub, reply.code);
  }

  _unsubscribe(sub) {
    if (sub.state === "unsubscribed") return;
    if (this.state === "connected") {
      this._ws.send(JSON.stringify({ op: "unsubscribe", channel: sub.channel }));
    }
    this._ended(sub, "client");
  }

  _ended(sub, reason) {
    sub.state = "unsubscribed";
    sub._attempt++;
    sub._emit("unsubscribed", { channel: sub.channel, reason });
  }

  // -- requests ---------------------------------------------------------------

  publish(channel, data) {
    return this._call({ op: "publish", channel, data });
  }

  history(channel, options = {}) {
    const op = { op: "history", channel };
    if (options.limit !== undefined) op.limit = options.limit;
    return this._call(op);
  }

  presence(channel) {
    return this._call({ op: "presence", channel });
  }

  presenceStats(channel) {
    return this._call({ op: "presence_stats", channel });
  }

  /** Send now when connected; while connecting, with the next connection or never. */
  _call(op) {
    return new Promise((resolve, reject) => {
      const settle = (reply) => {
        if (!reply) {
          reject(new WsBrokerError("disconnected", "the connection closed before the reply"));
        } else if (reply.type === "error") {
          reject(new WsBrokerError(reply.code, reply.message));
        } else {
          const { type, id, ...fields } = reply;
          resolve(fields);
        }
      };
      if (this.state === "connected") this._request(op, settle);
      else if (this.state === "connecting") this._queue.push([op, settle]);
      else settle(null);
    });
  }

  _request(op, settle) {
    const id = this._nextId++;
    let frame;
    try {
      frame = JSON.stringify({ ...op, id });
    } catch (error) { // a BigInt or a cycle in `data`: the server would say the same
      return settle({ type: "error", code: "bad_request", message: String(error) });
    }
    this._pending.set(id, settle);
    this._ws.send(frame);
  }
}
