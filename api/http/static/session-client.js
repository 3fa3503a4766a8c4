// session-client.js: the page's half of session-ledger's browser mode.
//
// One ES module without dependencies or a build step. The refresh token never reaches this code:
// it travels in an HttpOnly cookie that only /browser/refresh and /browser/logout read. The
// access token lives in this object's memory only (and in messages to this origin's other tabs).
//
//   import { SessionClient } from "/static/session-client.js";
//   const client = new SessionClient({ clientId: "spa" });
//   client.addEventListener("logged-out", (e) => showLogin(e.detail.reason));
//   if (!(await client.resume())) await client.login(username, password);
//   const response = await client.fetch("/sessions"); // Bearer added; a 401 refreshes once
//
// Events (CustomEvent, details in braces): "logged-in" {source}, "refreshed" {expiresAt,
// source: "self" | "tab"}, "idle-logout", "reuse-detected", "logged-out" {reason: "logout" |
// "everywhere" | "idle" | "reuse" | "expired" | "ended"}.

const ACTIVITY_EVENTS = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart"];
const MAX_SKEW_MS = 5_000; // a token this close to its expiry is not sent any more
const RETRY_MS = 5_000; // after a refresh that failed for a transient reason
const PEER_WAIT_MS = 10_000; // the longest wait for another tab's token

/** A refused request: `error` and `description` are the server's RFC 6749 fields. */
export class SessionError extends Error {
  constructor(error, description, status) {
    super(description || error);
    this.name = "SessionError";
    this.error = error;
    this.description = description;
    this.status = status;
  }
}

export class SessionClient extends EventTarget {
  #base;
  #clientId;
  #options;
  #locks;
  #lockName;
  #channel = null;
  #tabId = Math.random().toString(36).slice(2);
  #token = null;
  #sid = null;
  #expiresAt = 0;
  #lifetime = 0;
  #idleTimeout = 0;
  #lastActivity = 0; // user input in any tab, as far as this tab knows
  #lastRefresh = 0; // the newest token's arrival, in any tab
  #lastReport = 0; // the newest activity report to the server, from any tab
  #stamp = 0; // counts token changes, so a waiting refresh sees that another tab did it
  #issued = 0; // tokens this tab obtained; with #tabId, names them to the other tabs
  #heard = new Map(); // tab id -> the newest of its tokens this tab has heard of
  #releaseMarker = null;
  #waiters = []; // predicates re-checked on every message from another tab
  #peerBusyUntil = 0;
  #refreshing = null;
  #ended = new Set(); // sessions logged out here: late tokens of theirs are ignored
  #timers = { refresh: 0, idle: 0, report: 0 };
  #listening = false;
  #onInput = () => this.#noteActivity();

  /**
   * @param {object} options
   * @param {string} options.clientId the public client registered for this app
   * @param {string} [options.baseUrl] where the ledger's API is ("" = this origin)
   * @param {number} [options.refreshMargin] refresh this many seconds before expiry (at most a
   *   fifth of the token's lifetime)
   * @param {number} [options.activityInterval] report activity at most this often, in seconds
   * @param {string[]} [options.activityEvents] the events on `window` that count as activity
   * @param {string[]} [options.tokenOrigins] origins `fetch` may send the access token to
   */
  constructor({
    clientId,
    baseUrl = "",
    refreshMargin = 60,
    activityInterval = 60,
    activityEvents = ACTIVITY_EVENTS,
    tokenOrigins,
  } = {}) {
    super();
    if (!clientId) throw new TypeError("SessionClient needs a clientId");
    this.#clientId = clientId;
    this.#base = baseUrl.replace(/\/+$/, "");
    const apiOrigin = new URL(this.#base || "/", location.href).origin;
    this.#options = {
      refreshMargin: refreshMargin * 1000,
      activityInterval: activityInterval * 1000,
      activityEvents,
      tokenOrigins: new Set(tokenOrigins ?? [apiOrigin]),
    };
    this.#locks = globalThis.navigator?.locks ?? null;
    this.#lockName = `session-ledger:${clientId}`;
    if (typeof BroadcastChannel === "function") {
      this.#channel = new BroadcastChannel(this.#lockName);
      this.#channel.onmessage = (event) => this.#receive(event.data);
    }
  }

  get isLoggedIn() {
    return this.#token !== null;
  }

  /** When the access token expires, in milliseconds since the epoch on this page's clock. */
  get expiresAt() {
    return this.#token === null ? null : this.#expiresAt;
  }

  async login(username, password, { scope } = {}) {
    const body = { username, password, client_id: this.#clientId };
    if (scope) body.scope = scope;
    await this.#adopt(await this.#call("/browser/login", body), "login");
  }

  /** Continue the session of the refresh cookie, if any (on page load); true when logged in. */
  async resume() {
    try {
      return (await this.refresh()) !== null;
    } catch {
      return false;
    }
  }

  /** A new access token (or null when the session is over); concurrent callers share one. */
  refresh() {
    if (this.#refreshing === null) {
      this.#refreshing = this.#refreshOnce(this.#stamp).finally(() => {
        this.#refreshing = null;
      });
    }
    return this.#refreshing;
  }

  /** `fetch` with the Bearer token; a 401 refreshes once and replays the request. */
  async fetch(input, init) {
    const request = new Request(input, init);
    if (!this.#options.tokenOrigins.has(new URL(request.url).origin)) return fetch(request);
    const token = await this.#freshToken();
    const response = await this.#authorized(request, token);
    if (response.status !== 401 || token === null) return response;
    const newer = this.#token !== null && this.#token !== token;
    const renewed = newer ? this.#token : await this.refresh();
    return renewed === null ? response : this.#authorized(request, renewed);
  }

  /** End this session (`everywhere`: every session of the user) in every tab. */
  async logout({ everywhere = false } = {}) {
    try {
      if (everywhere && this.#token !== null) {
        await this.fetch(`${this.#base}/sessions`, { method: "DELETE" });
      }
      await this.#exclusively(() => this.#call("/browser/logout", { client_id: this.#clientId }));
    } finally {
      this.#end(everywhere ? "everywhere" : "logout", true);
    }
  }

  close() {
    this.#clearTimers();
    this.#listen(false);
    this.#releaseMarker?.();
    this.#channel?.close();
  }

  // -- tokens --------------------------------------------------------------------------------

  async #refreshOnce(seen) {
    const before = await this.#markers();
    return this.#exclusively(async () => {
      if (this.#stamp === seen) await this.#hearTokensIssuedSince(before);
      return this.#stamp !== seen ? this.#token : this.#refreshNow();
    });
  }

  async #refreshNow() {
    let body;
    try {
      body = await this.#call("/browser/refresh", { client_id: this.#clientId });
    } catch (error) {
      if (!(error instanceof SessionError) || error.error !== "invalid_grant") throw error;
      this.#end(endReason(error.description), true);
      return null;
    }
    await this.#adopt(body, "self");
    return this.#token;
  }

  async #freshToken() {
    if (this.#refreshing !== null) await this.#refreshing.catch(() => null);
    if (this.#token === null) return null;
    const skew = Math.min(MAX_SKEW_MS, this.#lifetime / 10);
    return Date.now() < this.#expiresAt - skew ? this.#token : this.refresh();
  }

  #authorized(request, token) {
    const copy = request.clone(); // the original keeps its body for a replay
    if (token !== null) copy.headers.set("Authorization", `Bearer ${token}`);
    return fetch(copy);
  }

  #adopt(body, source) {
    // expires_in counts from now on this page's clock, so a skewed clock does not matter.
    const at = Date.now();
    const grant = {
      token: body.access_token,
      expiresAt: at + body.expires_in * 1000,
      lifetime: body.expires_in * 1000,
      idleTimeout: (body.idle_timeout ?? 0) * 1000,
      at,
    };
    this.#apply(grant, source);
    this.#issued += 1;
    this.#broadcast({ type: "token", ...grant, from: this.#tabId, seq: this.#issued });
    return this.#mark(this.#issued);
  }

  #apply(grant, source) {
    const wasIn = this.#token !== null;
    this.#token = grant.token;
    this.#sid = sessionOf(grant.token);
    this.#expiresAt = grant.expiresAt;
    this.#lifetime = grant.lifetime;
    this.#idleTimeout = grant.idleTimeout;
    this.#lastRefresh = Math.max(this.#lastRefresh, grant.at);
    if (!wasIn) this.#lastActivity = Math.max(this.#lastActivity, grant.at);
    this.#stamp += 1;
    this.#listen(true);
    this.#schedule();
    if (!wasIn) this.#emit("logged-in", { source });
    if (source !== "login") this.#emit("refreshed", { expiresAt: grant.expiresAt, source });
  }

  #end(reason, broadcast) {
    const wasIn = this.#token !== null;
    if (broadcast && this.#sid !== null) this.#broadcast({ type: "logout", reason, sid: this.#sid });
    if (this.#sid !== null) this.#ended.add(this.#sid);
    this.#token = null;
    this.#sid = null;
    this.#stamp += 1;
    this.#releaseMarker?.();
    this.#clearTimers();
    this.#listen(false);
    if (reason === "reuse") this.#emit("reuse-detected", {});
    if (wasIn && reason === "idle") this.#emit("idle-logout", {});
    if (wasIn) this.#emit("logged-out", { reason });
  }

  // -- timers: refresh before expiry while the user is active, log out when idle ------------

  #margin() {
    return Math.min(this.#options.refreshMargin, this.#lifetime / 5);
  }

  #schedule() {
    clearTimeout(this.#timers.refresh);
    const delay = this.#expiresAt - this.#margin() - Date.now();
    this.#timers.refresh = setTimeout(() => this.#refreshDue(), delay);
    this.#scheduleIdle();
  }

  #refreshDue() {
    // Idle since the newest token: let it lapse, since a refresh would count as activity and
    // keep an abandoned session alive. Input or a call through fetch() revives it.
    if (this.#token === null || this.#lastActivity <= this.#lastRefresh) return;
    this.refresh().catch(() => {
      this.#timers.refresh = setTimeout(() => this.#refreshDue(), RETRY_MS);
    });
  }

  #scheduleIdle() {
    clearTimeout(this.#timers.idle);
    if (this.#token === null || !this.#idleTimeout) return;
    const delay = this.#idleDeadline() - Date.now();
    this.#timers.idle = setTimeout(() => this.#idleDue(), Math.max(0, delay));
  }

  #idleDeadline() {
    // Not before the server's: it counts activity this tab reported or heard of, and refreshes.
    return Math.max(this.#lastActivity, this.#lastRefresh) + this.#idleTimeout;
  }

  async #idleDue() {
    if (this.#token === null) return;
    if (Date.now() < this.#idleDeadline()) return this.#scheduleIdle();
    try {
      // The server has expired the session already: this records the end and clears the cookie.
      await this.#exclusively(() => this.#call("/browser/logout", { client_id: this.#clientId }));
    } catch {
      // The session is over either way.
    }
    this.#end("idle", true);
  }

  #clearTimers() {
    for (const name of Object.keys(this.#timers)) {
      clearTimeout(this.#timers[name]);
      this.#timers[name] = 0;
    }
  }

  // -- activity ------------------------------------------------------------------------------

  #listen(on) {
    if (on === this.#listening) return;
    this.#listening = on;
    for (const type of this.#options.activityEvents) {
      const options = { capture: true, passive: true };
      if (on) addEventListener(type, this.#onInput, options);
      else removeEventListener(type, this.#onInput, options);
    }
  }

  #noteActivity() {
    if (this.#token === null) return;
    const now = Date.now();
    this.#lastActivity = now;
    if (now >= this.#expiresAt - this.#margin()) this.refresh().catch(() => {}); // lapsed while idle
    const interval = this.#reportInterval();
    if (now - this.#lastReport >= interval) {
      this.#report();
    } else if (!this.#timers.report) {
      // Debounced: input since the last report is reported when the interval is over.
      this.#timers.report = setTimeout(() => {
        this.#timers.report = 0;
        if (this.#lastActivity > this.#lastReport) this.#report();
      }, this.#lastReport + interval - now);
    }
  }

  #reportInterval() {
    const quarterIdle = this.#idleTimeout ? this.#idleTimeout / 4 : Infinity;
    return Math.min(this.#options.activityInterval, quarterIdle);
  }

  #report() {
    const at = Date.now();
    this.#lastReport = at;
    this.#broadcast({ type: "activity", at });
    this.fetch(`${this.#base}/sessions/current/activity`, { method: "POST" }).catch(() => {});
  }

  // -- other tabs ----------------------------------------------------------------------------

  #broadcast(message) {
    this.#channel?.postMessage(message);
  }

  #receive(message) {
    switch (message?.type) {
      case "token":
        this.#heard.set(message.from, Math.max(this.#heard.get(message.from) ?? 0, message.seq));
        if (this.#takes(message)) this.#apply(message, "tab");
        break;
      case "activity":
        this.#lastActivity = Math.max(this.#lastActivity, message.at);
        this.#lastReport = Math.max(this.#lastReport, message.at);
        break;
      case "logout":
        this.#ended.add(message.sid);
        if (message.sid === this.#sid) this.#end(message.reason, false);
        break;
      case "busy":
        this.#peerBusyUntil = message.until;
        break;
    }
    if (message?.type === "token" || message?.type === "logout") this.#peerBusyUntil = 0;
    this.#waiters = this.#waiters.filter((done) => !done());
  }

  #takes({ token, expiresAt }) {
    const sid = sessionOf(token);
    if (this.#ended.has(sid)) return false; // a late token of a session logged out here
    return sid !== this.#sid || (token !== this.#token && expiresAt >= this.#expiresAt);
  }

  /** Resolves when `done()` holds after a message from another tab, or after PEER_WAIT_MS. */
  #waitFor(done) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, PEER_WAIT_MS); // that tab may have closed meanwhile
      const check = () => done() && (clearTimeout(timer), resolve(), true);
      if (!check()) this.#waiters.push(check);
    });
  }

  /** Run `task` while no other tab of this origin runs one: a refresh or a logout. */
  async #exclusively(task) {
    if (this.#locks !== null) return this.#locks.request(this.#lockName, task);
    // Without Web Locks: wait for a tab that announced a refresh to share its result. Two tabs
    // that announce at the same moment both refresh; the server's grace window gives the later
    // one the same successor token instead of treating it as reuse.
    if (Date.now() < this.#peerBusyUntil) await this.#waitFor(() => this.#peerBusyUntil === 0);
    this.#broadcast({ type: "busy", until: Date.now() + PEER_WAIT_MS });
    return task();
  }

  // Web Locks carry no data, and a tab may be granted the refresh lock before the token of the
  // tab that released it has reached it. So a tab holds a marker lock named after its newest
  // token, taken before it lets go of the refresh lock; a marker that appeared while a tab
  // waited for the lock means "a new token is on its way": it waits for it instead of
  // refreshing a second time.

  #mark(seq) {
    if (this.#locks === null) return Promise.resolve();
    this.#releaseMarker?.();
    return new Promise((marked) => {
      this.#locks.request(`${this.#lockName}:issued:${this.#tabId}:${seq}`, () => {
        marked();
        return new Promise((release) => {
          this.#releaseMarker = release;
        });
      });
    });
  }

  async #markers() {
    if (this.#locks === null) return new Set();
    const { held = [] } = await this.#locks.query();
    const prefix = `${this.#lockName}:issued:`;
    return new Set(held.map((lock) => lock.name).filter((name) => name.startsWith(prefix)));
  }

  async #hearTokensIssuedSince(before) {
    for (const name of await this.#markers()) {
      const [tab, seq] = name.split(":").slice(-2);
      if (before.has(name) || tab === this.#tabId) continue;
      await this.#waitFor(() => (this.#heard.get(tab) ?? 0) >= Number(seq));
    }
  }

  // -- HTTP ----------------------------------------------------------------------------------

  async #call(path, payload) {
    const response = await fetch(`${this.#base}${path}`, {
      method: "POST",
      credentials: "include",
      cache: "no-store",
      headers: { "Content-Type": "application/json", "X-Requested-With": "session-client" },
      body: JSON.stringify(payload),
    });
    if (response.status === 204) return null;
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = body.error ?? `http_${response.status}`;
      throw new SessionError(error, body.error_description ?? response.statusText, response.status);
    }
    return body;
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function endReason(description = "") {
  if (/reuse/i.test(description)) return "reuse";
  if (/inactivity/i.test(description)) return "idle";
  if (/maximum lifetime/i.test(description)) return "expired";
  return "ended";
}

/** The session id (`sid`) of an access token: read to tell sessions apart, never trusted. */
function sessionOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    return JSON.parse(atob(padded)).sid ?? null;
  } catch {
    return null;
  }
}
