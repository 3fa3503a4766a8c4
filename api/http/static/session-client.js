// session-client.js: the page's half of session-ledger's browser mode.
//
// One ES module without dependencies or a build step. The refresh token never reaches this code:
// it travels in an HttpOnly cookie that only /browser/refresh and /browser/logout read. The
// access token lives in this object's memory only (and in messages to this origin's other tabs).
// By default each login makes a DPoP key pair (RFC 9449) that no script can export, kept in
// IndexedDB for this origin's tabs: the server binds the session to it, and the cookie and the
// access token are then worth nothing without a proof signed by it.
//
//   import { SessionClient } from "/static/session-client.js";
//   const client = new SessionClient({ clientId: "spa" });
//   client.addEventListener("logged-out", (e) => showLogin(e.detail.reason));
//   if (!(await client.handleRedirect()) && !(await client.resume())) {
//     await client.loginWithRedirect(); // the server's login page; or client.login(user, password)
//   }
//   const response = await client.fetch("/sessions"); // token, proof added; 401: refresh once
//
// Events (CustomEvent, details in braces): "logged-in" {source}, "refreshed" {expiresAt,
// source: "self" | "tab"}, "idle-logout", "reuse-detected", "logged-out" {reason: "logout" |
// "everywhere" | "idle" | "reuse" | "expired" | "ended"}.

const ACTIVITY_EVENTS = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart"];
const MAX_SKEW_MS = 5_000; // a token this close to its expiry is not sent any more
const RETRY_MS = 5_000; // after a refresh that failed for a transient reason
const PEER_WAIT_MS = 10_000; // the longest wait for another tab's token
export const DPOP_DATABASE = "session-ledger-dpop"; // IndexedDB: one key per client id
const PENDING_LOGIN = "session-ledger:login"; // sessionStorage: the PKCE verifier and state
const ANSWER_PARAMETERS = ["code", "state", "iss", "error", "error_description", "error_uri"];
const DPOP_STORE = "keys";

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
  #tokenType = "Bearer";
  #sid = null;
  #dpop; // this client's DPoP keys, or null when it does not bind sessions
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
   * @param {boolean} [options.dpop] bind sessions to a DPoP key (needs WebCrypto and IndexedDB)
   * @param {"ES256" | "EdDSA"} [options.dpopAlgorithm] the key's algorithm; EdDSA (Ed25519)
   *   where the browser has it, else ES256
   * @param {string} [options.issuer] the server's issuer, which its login answers name in
   *   `iss` (RFC 9207); by default the API's URL (baseUrl, or this origin)
   */
  constructor({
    clientId,
    baseUrl = "",
    refreshMargin = 60,
    activityInterval = 60,
    activityEvents = ACTIVITY_EVENTS,
    tokenOrigins,
    dpop = true,
    dpopAlgorithm = "ES256",
    issuer,
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
      issuer: (issuer ?? new URL(this.#base || "/", location.href).href).replace(/\/+$/, ""),
    };
    this.#locks = globalThis.navigator?.locks ?? null;
    this.#lockName = `session-ledger:${clientId}`;
    const capable = globalThis.crypto?.subtle && globalThis.indexedDB;
    this.#dpop = dpop && capable ? new DpopKeys(clientId, dpopAlgorithm) : null;
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

  /** Log in with a password this page collected (the password grant must be registered). */
  async login(username, password, { scope } = {}) {
    const body = { username, password, client_id: this.#clientId };
    if (scope) body.scope = scope;
    await this.#start("/browser/login", body);
  }

  /**
   * Log in on the server's own login page, so that this page never sees the password: the
   * authorization-code flow with PKCE (RFC 7636). The browser leaves for the login page and
   * comes back to `redirectUri` (registered for this client; by default this page's URL), where
   * `handleRedirect()` finishes. The PKCE verifier waits in this tab's sessionStorage.
   */
  async loginWithRedirect({ redirectUri, scope } = {}) {
    const back = redirectUri ?? withoutAnswer(location.href);
    const verifier = base64url(crypto.getRandomValues(new Uint8Array(32)));
    const state = base64url(crypto.getRandomValues(new Uint8Array(16)));
    sessionStorage.setItem(PENDING_LOGIN, JSON.stringify({ verifier, state, redirectUri: back }));
    const query = new URLSearchParams({
      response_type: "code",
      client_id: this.#clientId,
      redirect_uri: back,
      code_challenge: base64url(await sha256(verifier)),
      code_challenge_method: "S256",
      state,
    });
    if (scope) query.set("scope", scope);
    location.assign(`${this.#base}/oauth/authorize?${query}`);
  }

  /**
   * On the page the login page came back to: exchange its code for a session (true), or
   * nothing to do (false). The answer's parameters are taken out of the address bar. An error
   * the server sent back, or an answer that does not match a login started in this tab
   * (`state`, `iss`), throws a SessionError.
   */
  async handleRedirect(url = location.href) {
    const answer = new URL(url).searchParams;
    if (!answer.has("code") && !answer.has("error")) return false;
    const pending = JSON.parse(sessionStorage.getItem(PENDING_LOGIN) ?? "null");
    sessionStorage.removeItem(PENDING_LOGIN);
    if (url === location.href) history.replaceState(history.state, "", withoutAnswer(url));
    if (pending === null || answer.get("state") !== pending.state) {
      throw new SessionError("invalid_state", "this login answer is not for a login started here");
    }
    if (answer.has("iss") && answer.get("iss") !== this.#options.issuer) {
      throw new SessionError("invalid_issuer", "this login answer comes from another server");
    }
    if (answer.has("error")) {
      throw new SessionError(answer.get("error"), answer.get("error_description") ?? "");
    }
    const body = {
      client_id: this.#clientId,
      code: answer.get("code"),
      redirect_uri: pending.redirectUri,
      code_verifier: pending.verifier,
    };
    await this.#start("/browser/token", body);
    return true;
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

  /** `fetch` with the access token (and a DPoP proof for a bound one); a 401 refreshes once and
   * replays the request. */
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
      await this.#exclusively(() => this.#callLogout());
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

  async #start(path, body) {
    const key = await this.#dpop?.generate(); // a new session, a new key
    const granted = await this.#call(path, body, key);
    if (key) await this.#dpop.keep(key, sessionOf(granted.access_token)); // before other tabs hear
    await this.#adopt(granted, "login");
  }

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
      const key = await this.#dpop?.current();
      body = await this.#call("/browser/refresh", { client_id: this.#clientId }, key);
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

  async #authorized(request, token) {
    if (token === null) return fetch(request.clone()); // the original keeps its body for a replay
    const dpop = this.#tokenType === "DPoP" ? await this.#dpop?.current() : null;
    if (!dpop) {
      const copy = request.clone();
      copy.headers.set("Authorization", `Bearer ${token}`);
      return fetch(copy);
    }
    // RFC 9449 §7: the DPoP scheme, and a proof of this request that holds the token's hash.
    for (let attempt = 0; ; attempt++) {
      const copy = request.clone();
      copy.headers.set("Authorization", `DPoP ${token}`);
      copy.headers.set("DPoP", await dpop.proof(copy.method, copy.url, token));
      const response = await fetch(copy);
      if (attempt > 0 || !(await dpop.askedForNonce(response))) return response;
    }
  }

  #adopt(body, source) {
    // expires_in counts from now on this page's clock, so a skewed clock does not matter.
    const at = Date.now();
    const grant = {
      token: body.access_token,
      tokenType: body.token_type,
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
    const sid = sessionOf(grant.token);
    if (source === "tab" && sid !== this.#sid) this.#dpop?.forget(); // its key is in the store
    this.#token = grant.token;
    this.#tokenType = grant.tokenType;
    this.#sid = sid;
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
    // The session's key is worth nothing now: the tab that ends it deletes it.
    if (broadcast && this.#sid !== null) this.#dpop?.discard(this.#sid).catch(() => {});
    this.#dpop?.forget();
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
      await this.#exclusively(() => this.#callLogout());
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

  async #callLogout() {
    const key = await this.#dpop?.current();
    return this.#call("/browser/logout", { client_id: this.#clientId }, key);
  }

  /** POST `payload` to a /browser endpoint, with a DPoP proof by `key` when there is one. */
  async #call(path, payload, key = null) {
    const url = `${this.#base}${path}`;
    let response;
    for (let attempt = 0; ; attempt++) {
      const headers = { "Content-Type": "application/json", "X-Requested-With": "session-client" };
      if (key) headers.DPoP = await key.proof("POST", url);
      response = await fetch(url, {
        method: "POST",
        credentials: "include",
        cache: "no-store",
        headers,
        body: JSON.stringify(payload),
      });
      if (!key || attempt > 0 || !(await key.askedForNonce(response))) break; // retry once
    }
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

/** `url` without the parameters of a login answer (RFC 6749 §4.1.2, RFC 9207). */
function withoutAnswer(url) {
  const clean = new URL(url);
  for (const name of ANSWER_PARAMETERS) clean.searchParams.delete(name);
  clean.hash = "";
  return clean.href;
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

// -- DPoP (RFC 9449) ------------------------------------------------------------------------------

/** This client's DPoP key in IndexedDB, shared by the origin's tabs, with the servers' nonces. */
class DpopKeys {
  #name;
  #algorithm;
  #nonces = new Map(); // origin -> the DPoP-Nonce it sent last (§8, §9)
  #current = null; // a promise of the stored key, until another tab may have replaced it

  constructor(clientId, algorithm) {
    this.#name = clientId;
    this.#algorithm = algorithm;
  }

  /** A new key pair, its private half not extractable; null where WebCrypto refuses. */
  async generate() {
    try {
      const { pair, alg } = await generatePair(this.#algorithm);
      const jwk = publicMembers(await crypto.subtle.exportKey("jwk", pair.publicKey));
      return new DpopKey(pair.privateKey, alg, jwk, this.#nonces);
    } catch (error) {
      console.warn("session-client: no DPoP key, the session is not bound", error);
      return null;
    }
  }

  /** Keep `key` as the key of the session `sid`, in place of any before it. */
  async keep(key, sid) {
    const record = { privateKey: key.privateKey, alg: key.alg, jwk: key.jwk, sid };
    await keyStore("readwrite", (store) => store.put(record, this.#name));
    this.#current = Promise.resolve(key);
  }

  /** The stored key, or null. */
  current() {
    this.#current ??= keyStore("readonly", (store) => store.get(this.#name)).then(
      (record) => record && new DpopKey(record.privateKey, record.alg, record.jwk, this.#nonces),
      () => null,
    );
    return this.#current;
  }

  /** Read the store again on next use (another tab may have replaced the key). */
  forget() {
    this.#current = null;
  }

  /** Delete the stored key if it is the session `sid`'s (not a newer login's). */
  discard(sid) {
    this.#current = null;
    return keyStore("readwrite", (store) => {
      const stored = store.get(this.#name);
      stored.onsuccess = () => {
        if (stored.result?.sid === sid) store.delete(this.#name);
      };
    });
  }
}

class DpopKey {
  #nonces;

  constructor(privateKey, alg, jwk, nonces) {
    this.privateKey = privateKey;
    this.alg = alg;
    this.jwk = jwk;
    this.#nonces = nonces;
  }

  /** A proof (§4.2) for `method` on `url`; with `accessToken`, for a resource request (§7). */
  async proof(method, url, accessToken) {
    const target = new URL(url, location.href);
    target.search = ""; // §4.2: htu without query and fragment
    target.hash = "";
    const claims = {
      jti: base64url(crypto.getRandomValues(new Uint8Array(16))),
      htm: method,
      htu: target.href,
      iat: Math.floor(Date.now() / 1000),
    };
    if (accessToken) claims.ath = base64url(await sha256(accessToken));
    const nonce = this.#nonces.get(target.origin);
    if (nonce) claims.nonce = nonce;
    const header = { typ: "dpop+jwt", alg: this.alg, jwk: this.jwk };
    const input = `${base64urlJson(header)}.${base64urlJson(claims)}`;
    const signature = await crypto.subtle.sign(
      SIGNING[this.alg],
      this.privateKey,
      new TextEncoder().encode(input),
    );
    return `${input}.${base64url(signature)}`;
  }

  /** Note the response's DPoP-Nonce; true when it refused the proof for want of that nonce. */
  async askedForNonce(response) {
    const nonce = response.headers.get("DPoP-Nonce");
    if (!nonce) return false;
    this.#nonces.set(new URL(response.url).origin, nonce);
    if (response.status === 401) {
      return /error="use_dpop_nonce"/.test(response.headers.get("WWW-Authenticate") ?? "");
    }
    if (response.status !== 400) return false;
    const body = await response.clone().json().catch(() => ({}));
    return body.error === "use_dpop_nonce";
  }
}

const SIGNING = { ES256: { name: "ECDSA", hash: "SHA-256" }, EdDSA: { name: "Ed25519" } };

async function generatePair(algorithm) {
  if (algorithm === "EdDSA") {
    try {
      const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      return { pair, alg: "EdDSA" };
    } catch {
      // This browser has no Ed25519: ES256, which every one has.
    }
  }
  const ecdsa = { name: "ECDSA", namedCurve: "P-256" };
  return { pair: await crypto.subtle.generateKey(ecdsa, false, ["sign", "verify"]), alg: "ES256" };
}

function publicMembers({ kty, crv, x, y }) {
  return y === undefined ? { kty, crv, x } : { kty, crv, x, y };
}

/** Run `use` on the key store in one transaction; its request's result, once committed. */
function keyStore(mode, use) {
  return new Promise((resolve, reject) => {
    const opening = indexedDB.open(DPOP_DATABASE, 1);
    opening.onupgradeneeded = () => opening.result.createObjectStore(DPOP_STORE);
    opening.onerror = () => reject(opening.error);
    opening.onsuccess = () => {
      const db = opening.result;
      const tx = db.transaction(DPOP_STORE, mode);
      const request = use(tx.objectStore(DPOP_STORE));
      tx.oncomplete = () => {
        db.close();
        resolve(request?.result);
      };
      tx.onerror = tx.onabort = () => {
        db.close();
        reject(tx.error);
      };
    };
  });
}

async function sha256(text) {
  return crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
}

function base64urlJson(value) {
  return base64url(new TextEncoder().encode(JSON.stringify(value)));
}

function base64url(bytes) {
  const binary = String.fromCharCode(...new Uint8Array(bytes));
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
