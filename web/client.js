// rowcast JavaScript client: an ES module, no build step. Served by rowcast at /client.js.
//
//   import { connect } from "/client.js";
//   const rowcast = connect("ws://127.0.0.1:8080/ws/events", { token, onState: console.log });
//   const stop = rowcast.subscribe({ type: "agent.*", organization_id: "quant" }, (event) => {});
//   stop(); // unsubscribe
//
// Guarantees: each subscription remembers the id of the last event it delivered and resumes
// from it (`since`) after a reconnect, and drops anything at or below it, so a reconnect loses
// nothing and repeats nothing. Identical filters share one server subscription (except those
// asking for a `history` backlog). Reconnects
// back off exponentially with jitter, except after a refused token: a socket that closes
// before it opened is checked with one HTTP request, and a 401 stops reconnecting (state
// `unauthorized`) until `reconnect()` is called with a better token.

/** Connection states passed to `onState`. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  UNAUTHORIZED: "unauthorized",
  CLOSED: "closed",
});

/**
 * Opens a client. `url` is the WebSocket URL (`ws://host/ws/events`); options:
 * - `token`: a string, or a function returning one (or a promise of one), asked at each
 *   (re)connection; sent as the `rowcast.bearer.<token>` subprotocol.
 * - `onState(state, detail)`: connection state changes.
 * - `onReset(filter, oldestId)`: the log no longer held a subscription's resume point.
 * - `onError(frame)`: error frames from the server.
 * - `onRefused(filter, message, code)`: a subscription the server refused (and dropped).
 * - `onCaughtUp(filter, lastId)`: a subscription's backlog (`since`, `history`) is delivered.
 * - `minBackoff`, `maxBackoff` (ms): reconnect delays (default 250 and 15000).
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/** Canonical key of a filter, so identical filters (in any key or list order) share. */
export function filterKey(filter = {}) {
  const out = {};
  for (const key of Object.keys(filter).sort()) {
    const value = filter[key];
    if (value === undefined || value === null) continue;
    const list = Array.isArray(value) ? value : key === "severity" ? null : [value];
    out[key] = list ? [...new Set(list)].sort() : value;
  }
  return JSON.stringify(out);
}

class Client {
  constructor(url, options) {
    this.url = url;
    this.options = options;
    this.minBackoff = options.minBackoff ?? 250;
    this.maxBackoff = options.maxBackoff ?? 15000;
    this.attempt = 0;
    this.state = null;
    this.socket = null;
    this.closed = false;
    this.nextRef = 1;
    // key -> { filter, handlers: Set, serverId, lastId }
    this.subscriptions = new Map();
    // server subscription id -> key
    this.byServerId = new Map();
    // ref -> key (subscribe) or replay
    this.pending = new Map();
    // replay id -> replay
    this.replays = new Map();
    this.open();
  }

  setState(state, detail) {
    if (this.state === state) return;
    this.state = state;
    this.options.onState?.(state, detail);
  }

  async open() {
    this.timer = null;
    if (this.closed) return;
    this.setState(this.attempt === 0 ? State.CONNECTING : State.RECONNECTING);
    let token = this.options.token;
    try {
      if (typeof token === "function") token = await token();
    } catch (err) {
      return this.retry(`token: ${err}`);
    }
    if (this.closed) return;
    token = typeof token === "string" ? token.trim() : token;
    const protocols = token ? ["rowcast.v1", `rowcast.bearer.${token}`] : [];
    let socket;
    try {
      socket = new WebSocket(this.url, protocols);
    } catch (err) {
      return this.retry(String(err));
    }
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
    };
    socket.onmessage = (message) => this.receive(message.data);
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      // Server ids are per connection (`s1` again after a reconnect): forget them all.
      this.byServerId.clear();
      for (const sub of this.subscriptions.values()) {
        sub.serverId = null;
        sub.ref = null;
      }
      for (const waiting of this.pending.values()) waiting.fail?.("connection lost");
      this.pending.clear();
      for (const replay of this.replays.values()) replay.fail("connection lost");
      this.replays.clear();
      if (this.closed) return this.setState(State.CLOSED);
      const why = `closed ${event.code}${event.reason ? `: ${event.reason}` : ""}`;
      // A browser hides the status of a refused upgrade: a close before open (or 4001, token
      // expired) may be a 401, which retrying with the same token would only repeat.
      if (!opened || event.code === 4001) return this.checkToken(token, why);
      this.retry(why);
    };
  }

  async checkToken(token, why) {
    const probe = new URL(this.url);
    probe.protocol = probe.protocol === "wss:" ? "https:" : "http:";
    probe.pathname = "/api/events/metadata";
    probe.search = "";
    let status = 0;
    try {
      const headers = token ? { Authorization: `Bearer ${token}` } : {};
      status = (await fetch(probe, { headers, cache: "no-store" })).status;
    } catch {
      // Unreachable: an ordinary reconnect.
    }
    if (this.closed) return;
    if (status === 401) {
      clearTimeout(this.timer);
      this.timer = null;
      return this.setState(State.UNAUTHORIZED, token ? "token refused" : "token required");
    }
    this.retry(why);
  }

  /** Connects again now (after `unauthorized`, with the token option giving a new token). */
  reconnect() {
    if (this.closed || this.socket) return;
    clearTimeout(this.timer);
    this.attempt = 0;
    this.state = null;
    this.open();
  }

  retry(why) {
    if (this.closed) return;
    this.setState(State.RECONNECTING, why);
    const ceiling = Math.min(this.maxBackoff, this.minBackoff * 2 ** this.attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.attempt += 1;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }

  send(frame) {
    if (this.socket?.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const type = String(frame.type ?? "");
    if (type.includes(".")) return this.event(frame);
    switch (type) {
      case "welcome":
        this.attempt = 0;
        for (const sub of this.subscriptions.values()) this.sendSubscribe(sub);
        this.setState(State.OPEN);
        break;
      case "subscribed": {
        const sub = this.pending.get(frame.ref)?.sub;
        this.pending.delete(frame.ref);
        if (!sub || this.subscriptions.get(sub.key) !== sub || sub.ref !== frame.ref) {
          // Unsubscribed (or replaced) meanwhile: drop the server's copy.
          this.send({ action: "unsubscribe", subscription_id: frame.subscription_id });
          break;
        }
        sub.ref = null;
        sub.serverId = frame.subscription_id;
        this.byServerId.set(frame.subscription_id, sub.key);
        // A `history` backlog holds ids at or below `last_id`: its events set the cursor.
        if (sub.lastId === null && !sub.history) {
          sub.lastId = frame.last_id;
          for (const done of sub.onCaughtUp) done(sub.lastId, sub.history);
        }
        break;
      }
      case "caught_up": {
        const sub = this.subscriptions.get(this.byServerId.get(frame.subscription_id));
        if (sub) {
          sub.lastId = Math.max(sub.lastId ?? 0, frame.last_id);
          this.options.onCaughtUp?.(sub.filter, sub.lastId);
          for (const done of sub.onCaughtUp) done(sub.lastId, sub.history);
        }
        break;
      }
      case "reset": {
        const sub = this.subscriptions.get(this.byServerId.get(frame.subscription_id));
        if (sub) {
          sub.lastId = frame.oldest_id - 1;
          this.options.onReset?.(sub.filter, frame.oldest_id);
        }
        break;
      }
      case "replay_started": {
        const replay = this.pending.get(frame.ref);
        this.pending.delete(frame.ref);
        if (replay) {
          replay.id = frame.replay_id;
          this.replays.set(frame.replay_id, replay);
          replay.handlers.onStarted?.(frame.total);
          if (replay.stopped) this.send({ action: "stop_replay", replay_id: replay.id });
        }
        break;
      }
      case "replay_progress":
        this.replays.get(frame.replay_id)?.handlers.onProgress?.(frame.sent, frame.total);
        break;
      case "replay_finished":
      case "replay_stopped": {
        const replay = this.replays.get(frame.replay_id);
        this.replays.delete(frame.replay_id);
        replay?.handlers.onFinished?.(frame.sent ?? null, type === "replay_stopped");
        break;
      }
      case "error":
        if (frame.replay_id && this.replays.has(frame.replay_id)) {
          this.replays.get(frame.replay_id).fail(frame.message);
          this.replays.delete(frame.replay_id);
        }
        if (frame.code === "rate_limited") {
          // Refused before being acted on: send what is still unanswered again, after a pause.
          clearTimeout(this.resendTimer);
          this.resendTimer = setTimeout(() => {
            for (const sub of this.subscriptions.values()) {
              if (sub.ref && !sub.serverId) {
                this.pending.delete(sub.ref);
                this.sendSubscribe(sub);
              }
            }
          }, 1000);
        }
        let handled = false;
        if (this.pending.has(frame.ref)) {
          const waiting = this.pending.get(frame.ref);
          this.pending.delete(frame.ref);
          handled = waiting.fail?.(frame.message, frame.code) === true;
        }
        if (!handled) this.options.onError?.(frame);
        break;
      default:
        break;
    }
  }

  event(frame) {
    if (frame.replay_id) {
      this.replays.get(frame.replay_id)?.handlers.onEvent?.(frame);
      return;
    }
    const { subscription_ids: ids = [], ...event } = frame;
    for (const id of ids) {
      const sub = this.subscriptions.get(this.byServerId.get(id));
      if (!sub || (sub.lastId !== null && event.id <= sub.lastId)) continue;
      sub.lastId = event.id;
      for (const handler of sub.handlers) {
        try {
          handler(event);
        } catch (err) {
          console.error("rowcast handler failed", err);
        }
      }
    }
  }

  sendSubscribe(sub) {
    const ref = `s${this.nextRef++}`;
    sub.ref = ref;
    // A refusal is reported once and the subscription dropped: a forbidden filter will not
    // become allowed by retrying. A rate-limited one keeps its ref: `receive` sends it again.
    const fail = (message, code) => {
      if (this.subscriptions.get(sub.key) !== sub || sub.ref !== ref) return;
      if (code === "rate_limited") return;
      sub.ref = null;
      if (code === "bad_request" && sub.history && /history/.test(message ?? "")) {
        // A server without `history`: live events only (`onCaughtUp` is told).
        sub.history = null;
        this.sendSubscribe(sub);
        return true;
      }
      if (code) {
        this.subscriptions.delete(sub.key);
        this.options.onRefused?.(sub.filter, message, code);
      }
    };
    this.pending.set(ref, { sub, fail });
    const frame = { action: "subscribe", filter: sub.filter, ref };
    if (sub.lastId !== null) frame.since = sub.lastId;
    else if (sub.history) frame.history = sub.history;
    this.send(frame);
  }

  /**
   * Calls `handler(event)` for every event matching `filter`, once, in order. Returns the
   * function that unsubscribes. `options.since` resumes from a known event id;
   * `options.history` (1..1000) starts with the last that many matching events (a server
   * that refuses `history` gets a live-only subscription); `options.onCaughtUp(lastId,
   * history)` is called when the backlog is delivered (at once without one), with the
   * history count still in force (null if the server refused it).
   */
  subscribe(filter, handler, options = {}) {
    // A subscription resuming from a given id cannot share with one that is further along,
    // and one asking for a backlog shares with none: each gets its own.
    const since = options.since ?? null;
    const history = since === null && options.history > 0 ? Math.min(1000, Math.floor(options.history)) : null;
    const key = filterKey(filter) + (since === null ? "" : `@${since}`) + (history ? `~${history}#${this.nextRef++}` : "");
    let sub = this.subscriptions.get(key);
    if (!sub) {
      const copy = JSON.parse(JSON.stringify(filter ?? {}));
      sub = { key, filter: copy, handlers: new Set(), serverId: null, ref: null, lastId: since, history, onCaughtUp: new Set() };
      this.subscriptions.set(key, sub);
      if (this.socket?.readyState === WebSocket.OPEN && this.state === State.OPEN) this.sendSubscribe(sub);
    }
    const entry = (event) => handler(event);
    sub.handlers.add(entry);
    const caughtUp = options.onCaughtUp ? (lastId, history) => options.onCaughtUp(lastId, history) : null;
    if (caughtUp) {
      if (sub.serverId && sub.lastId !== null) caughtUp(sub.lastId, sub.history);
      sub.onCaughtUp.add(caughtUp);
    }
    return () => {
      sub.handlers.delete(entry);
      if (caughtUp) sub.onCaughtUp.delete(caughtUp);
      if (sub.handlers.size > 0 || this.subscriptions.get(key) !== sub) return;
      this.subscriptions.delete(key);
      if (sub.serverId) {
        this.byServerId.delete(sub.serverId);
        this.send({ action: "unsubscribe", subscription_id: sub.serverId });
      }
    };
  }

  /**
   * Replays historic events: `{filter, from, to, speed}` (times as Date or RFC 3339 strings).
   * Handlers: `onStarted(total)`, `onEvent(event)`, `onProgress(sent, total)`,
   * `onFinished(sent, stopped)`, `onError(message)`. Returns `{ stop() }`.
   */
  replay({ filter = {}, from, to, speed = 1 }, handlers = {}) {
    const iso = (t) => (t instanceof Date ? t.toISOString() : t);
    const ref = `r${this.nextRef++}`;
    const replay = {
      id: null,
      stopped: false,
      handlers,
      fail: (message) => handlers.onError?.(message),
    };
    this.pending.set(ref, replay);
    const sent = this.send({ action: "replay", filter, from: iso(from), to: iso(to), speed, ref });
    if (!sent) {
      this.pending.delete(ref);
      replay.fail("not connected");
    }
    return {
      stop: () => {
        replay.stopped = true;
        if (replay.id) this.send({ action: "stop_replay", replay_id: replay.id });
      },
    };
  }

  /** Closes for good. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.socket?.close(1000);
    if (!this.socket) this.setState(State.CLOSED);
  }
}
