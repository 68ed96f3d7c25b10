// scale-chat browser client.
//
// Joins the room named by the URL hash (/#room) over a WebSocket, shows every
// message of the room with its sender and time, and resumes with
// `since=<last seq seen>` after any disconnect, so nothing is missed and
// nothing is shown twice. One's own messages wait in an outbox until the
// server acknowledges them with an `ack` frame, which it sends to this socket
// alone: the room's copy of a message proves nothing, as anyone may connect
// under our name and post our next message_id. A message sent just as the
// connection drops is sent again after the reconnect, marked `resend`; the
// server de-duplicates it by this page's random client id (`client=`), which
// it never shows to anyone. The outbox goes out paced within the limits the
// server announces in `welcome`, so a backlog written offline is never refused
// for the page's own burst; a message refused over the rate anyway goes again
// after the error's `retry_after`, and a 1008 close is followed by a reconnect. A seq counts within the room's order, named by its
// `epoch`: the server begins a new order (seq from 1 again) whenever it lost
// the room's state, and a resume names the order its `since` counts in. A
// frame of another epoch than the page's means the order began again: the
// page says so and takes the new order's messages, whatever their seqs. The
// epoch is made by the server, so no client can forge or hide an order
// change. Message text only ever reaches the page through textContent. The
// page runs under a strict Content-Security-Policy: no inline script or
// style, no eval. State is exposed to tests through the DOM
// (#status[data-state], #members[data-count], li[data-seq], li[data-epoch],
// li[data-pending]), not through globals.

// ---- Settings -------------------------------------------------------------

const DEFAULT_ROOM = "lobby";
const ROOM_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;   // docs/protocol.md: anything else is 400
const NAME_MAX = 32;
const NAME_KEY = "scalechat.name";
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 15000;
const MAX_RENDERED = 500;          // a busy room must not grow the DOM without end
const GROUP_WINDOW_MS = 5 * 60 * 1000;
const NOTICE_MS = 6000;
const STICK_PX = 80;               // "at the bottom" tolerance for auto-scroll
const HUES = 8;                    // sender colours: .hue-0 ... .hue-7 in style.css
const UNAVAILABLE_RETRY_MS = 3000;  // after an `unavailable` error
const RETRY_AFTER_DEFAULT_MS = 1000;  // after a `rate_limit` error that does not say when
// The page's token buckets are this share of the server's (welcome.limits): messages
// bunched on their way to the server still find tokens there.
const PACE_MARGIN = 0.9;

const CLOSE_NORMAL = 1000;
const CLOSE_POLICY = 1008;
const CLOSE_TRY_AGAIN_LATER = 1013;

// ---- Page elements ----------------------------------------------------------

const $ = (id) => document.getElementById(id);
const ui = {
  room: $("room"), members: $("members"), status: $("status"), statusText: $("status-text"),
  retry: $("retry"), me: $("me"), meName: $("me-name"), meAvatar: $("me-avatar"),
  log: $("log"), messages: $("messages"), notice: $("notice"),
  composer: $("composer"), text: $("text"), send: $("send"),
  join: $("join"), joinForm: $("join-form"), joinName: $("join-name"), joinRoom: $("join-room"),
  joinUrl: $("join-url"), joinCancel: $("join-cancel"),
};

// ---- State ------------------------------------------------------------------

const state = {
  room: DEFAULT_ROOM,
  name: "",          // the name asked for (remembered in localStorage)
  me: "",            // the name the server gave this connection (welcome.name)
  ws: null,          // the current socket; events of older sockets are ignored
  connection: 0,     // counts sockets, so the outbox knows what went out on which
  epoch: "",         // the room's order that lastSeq counts in ("": none known yet)
  lastSeq: 0,        // highest seq shown in this room, in that order
  replayUntil: 0,    // welcome.seq: the resume replay is over once lastSeq reaches it
  caughtUp: false,   // replay over: the outbox may (re)send
  attempt: 0,        // failed connects in a row, for the backoff
  retryTimer: 0,
  countdownTimer: 0,
  retryAt: 0,
  // Sent as client= on every connect, picked once per page load: the server
  // matches a `resend` by client id and message_id, and never broadcasts the id.
  clientId: newClientId(),
  // Unique for this client id, which the resend check needs.
  messageId: Date.now() * 1000,
  outbox: new Map(), // message_id -> own message the server has not acked yet
  pacer: null,       // this socket's pace within the server's limits, from its welcome
  pumpTimer: 0,      // the outbox's next try once the pacer has a token
  // orderKey(epoch, seq) -> own message acked, its pending copy shown until the
  // room's frame comes; an ack of an order the page has not seen yet waits here too.
  acked: new Map(),
  noticeTimer: 0,
  stuck: true,       // the reader is at the end of the list: new messages keep it there
  followedTop: 0,    // where followEnd last scrolled to, to tell its scroll events apart
};

// ---- Small helpers ----------------------------------------------------------

/** 16 random bytes as base64url without padding (22 characters): this page's client id. */
function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Create an element with a class and, optionally, text (never HTML). */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A stable colour class for a sender name. */
function hueClass(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hue-${h % HUES}`;
}

/** The first letter of a name, for its avatar. */
function initial(name) {
  return (Array.from(name.trim())[0] || "?").toUpperCase();
}

const utf8 = new TextEncoder();

/** Now as RFC 3339 with microseconds, as docs/protocol.md asks for sent_at. */
function nowRfc3339() {
  const us = Math.round((performance.timeOrigin + performance.now()) * 1000);
  const micro = String(us % 1000).padStart(3, "0");
  return new Date(Math.floor(us / 1000)).toISOString().replace("Z", `${micro}Z`);
}

/** A message's time: its sent_at when it parses, else now. */
function messageTime(sentAt) {
  const t = typeof sentAt === "string" ? Date.parse(sentAt) : NaN;
  return Number.isNaN(t) ? new Date() : new Date(t);
}

const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const fullDate = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** A frame's epoch: "" when it has none (a room that has no order yet). */
function epochOf(frame) {
  return typeof frame.epoch === "string" ? frame.epoch : "";
}

/** What names a place in the room's history: a seq means something only with its epoch. */
function orderKey(epoch, seq) {
  return `${epoch}\u0000${seq}`;
}

/** localStorage can be unavailable (private modes, disabled storage): never fail on it. */
function remember(key, value) {
  try { localStorage.setItem(key, value); } catch { /* the name is just not remembered */ }
}

/** The remembered value, or "" when there is none or storage is unavailable. */
function recall(key) {
  try { return localStorage.getItem(key) || ""; } catch { return ""; }
}

// ---- Header: room, members, connection state -----------------------------------

/** Show the connection state: connecting | online | reconnecting | offline. */
function setStatus(stateName, text) {
  ui.status.dataset.state = stateName;
  ui.statusText.textContent = text;
  const waiting = stateName === "reconnecting" && state.retryTimer !== 0;
  ui.retry.hidden = !(waiting || (stateName === "offline" && state.name));
  ui.send.disabled = !state.name;
  ui.text.placeholder = stateName === "online" ? `Message #${state.room}`
    : "Offline: sent on reconnect";
}

/** Show the room's member count (welcome.members, members.count). */
function setMembers(count) {
  if (typeof count !== "number") return;
  ui.members.classList.remove("stale");
  ui.members.dataset.count = String(count);
  ui.members.textContent = `${count} online`;
}

/** Show who we are in the header: the server's name for us once known. */
function showIdentity() {
  const name = state.me || state.name;
  ui.meName.textContent = name || "Join";
  ui.meAvatar.textContent = initial(name);
  ui.meAvatar.className = name ? `avatar ${hueClass(name)}` : "avatar";
}

/** A short message near the composer that goes away by itself. */
function showNotice(text, kind = "error") {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = false;
  clearTimeout(state.noticeTimer);
  state.noticeTimer = setTimeout(() => { ui.notice.hidden = true; }, NOTICE_MS);
}

// ---- Message list -------------------------------------------------------------

/** True when the list shows its end, so new messages should keep it there. */
function atBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < STICK_PX;
}

/**
 * Keep the end of the list in view while the reader is there. It runs when the
 * list resizes, once per frame however many messages came: measuring after
 * each message instead would cost a layout per message in a busy room.
 */
function followEnd() {
  if (!state.stuck) return;
  ui.log.scrollTop = ui.log.scrollHeight;
  state.followedTop = ui.log.scrollTop;
}

/** The reader scrolled: follow new messages only while they are at the end. */
function onScroll() {
  if (ui.log.scrollTop !== state.followedTop) state.stuck = atBottom();   // not our own scroll
}

/** Add a list item above the own messages still waiting for the server, which stay last. */
function insert(node, forceScroll) {
  if (forceScroll) state.stuck = true;
  ui.messages.insertBefore(node, ui.messages.querySelector("li.pending"));
  while (ui.messages.children.length > MAX_RENDERED) ui.messages.firstElementChild.remove();
}

/** A centred line about the room or the connection, not a chat message. */
function addSystem(text) {
  insert(el("li", "system", text), false);
}

/** A message bubble: avatar and sender for others' messages, then text and time. */
function messageItem(sender, text, when, own) {
  const li = el("li", own ? "msg own" : "msg");
  li.dataset.sender = sender;
  li.dataset.time = String(when.getTime());
  const time = el("time", "", clock.format(when));
  time.dateTime = when.toISOString();
  time.title = fullDate.format(when);
  const bubble = el("div", "bubble");
  if (!own) {
    const avatar = el("span", `avatar ${hueClass(sender)}`, initial(sender));
    avatar.setAttribute("aria-hidden", "true");
    li.append(avatar);
    bubble.append(el("span", `sender ${hueClass(sender)}`, sender));
  }
  bubble.append(el("p", "text", text), time);
  li.append(bubble);
  return li;
}

/** Render one chat message of the room; consecutive ones from one sender form a group. */
function addMessage(msg) {
  const when = messageTime(msg.sent_at);
  const li = messageItem(msg.sender, String(msg.text ?? ""), when, msg.sender === state.me);
  li.dataset.seq = String(msg.seq);
  li.dataset.epoch = epochOf(msg);
  const next = ui.messages.querySelector("li.pending");
  const prev = next ? next.previousElementSibling : ui.messages.lastElementChild;
  if (prev !== null && prev.classList.contains("msg") && prev.dataset.sender === msg.sender &&
      when - Number(prev.dataset.time) < GROUP_WINDOW_MS) {
    li.classList.add("cont");
  }
  insert(li, msg.sender === state.me);
}

/** Empty the list, as when entering another room. */
function clearMessages() {
  ui.messages.replaceChildren();
}

// ---- Pacing: the server's rate limit, kept on the page's side -------------------------

/**
 * The server's token buckets (messages and bytes) as welcome.limits announces
 * them, a little smaller: what they let out, the server does not refuse. A
 * limit that is absent or 0 does not pace (an older server says none). Times
 * are performance.now() milliseconds.
 */
class Pacer {
  constructor(limits, now) {
    const limit = (key) => {
      const value = limits !== null && typeof limits === "object" ? limits[key] : undefined;
      return typeof value === "number" && value > 0 ? value : 0;
    };
    this.rate = PACE_MARGIN * limit("rate") / 1000;             // per ms
    this.burst = Math.max(1, Math.floor(PACE_MARGIN * limit("burst")));
    this.byteRate = PACE_MARGIN * limit("rate_bytes") / 1000;
    this.byteBurst = Math.max(1, Math.floor(PACE_MARGIN * limit("burst_bytes")));
    this.tokens = this.burst;        // full, as the server's are on a new connection
    this.byteTokens = this.byteBurst;
    this.time = now;
  }

  /** Milliseconds until a message of size bytes may go (0: now). */
  wait(size, now) {
    if (now < this.time) return this.time - now;   // held back by a retry_after
    const elapsed = now - this.time;
    this.time = now;
    let wait = 0;
    if (this.rate) {
      this.tokens = Math.min(this.burst, this.tokens + elapsed * this.rate);
      if (this.tokens < 1) wait = (1 - this.tokens) / this.rate;
    }
    if (this.byteRate) {
      this.byteTokens = Math.min(this.byteBurst, this.byteTokens + elapsed * this.byteRate);
      const need = Math.min(size, this.byteBurst);   // the server's bucket holds the largest message
      if (this.byteTokens < need) wait = Math.max(wait, (need - this.byteTokens) / this.byteRate);
    }
    return wait;
  }

  /** Whether a message of size bytes may go now; if so, it is paid for. */
  take(size, now) {
    if (this.wait(size, now) > 0) return false;
    this.tokens -= 1;
    this.byteTokens -= size;
    return true;
  }

  /** The server refused a message: its bucket holds a token again ms from now. */
  hold(ms, now) {
    this.wait(0, now);
    this.tokens = Math.min(this.tokens, 1);
    this.time = Math.max(this.time, now + ms);
  }
}

// ---- Outbox: own messages until the server has them ------------------------------

/** Queue a message of ours and show it as pending; it goes out now if it can. */
function queueMessage(text) {
  state.messageId += 1;
  const entry = {
    id: state.messageId, text, sentAt: nowRfc3339(), connection: 0, tries: 0,
    node: messageItem(state.me || state.name, text, new Date(), true),
  };
  entry.node.classList.add("pending");
  entry.node.dataset.pending = String(entry.id);
  entry.node.querySelector("time").textContent = "sending\u2026";
  ui.messages.append(entry.node);
  state.stuck = true;
  state.outbox.set(entry.id, entry);
  pump();
}

/** An outbox entry's frame; a second try is marked `resend`. */
function frameOf(entry) {
  const frame = { message_id: entry.id, text: entry.text, sent_at: entry.sentAt };
  if (entry.tries > 0) frame.resend = true;
  return JSON.stringify(frame);
}

/**
 * Send what the current socket has not sent yet, oldest first, as fast as the
 * pacer lets it; then try again once it has a token. A message held back (the
 * bus was unavailable) waits its turn without holding up the others.
 */
function pump() {
  clearTimeout(state.pumpTimer);
  state.pumpTimer = 0;
  if (!state.caughtUp || state.pacer === null) return;
  const now = performance.now();
  let wait = Infinity;
  for (const entry of state.outbox.values()) {
    if (entry.connection === state.connection) continue;   // sent on this socket: its ack is due
    if (entry.retryAt > now) {
      wait = Math.min(wait, entry.retryAt - now);
      continue;
    }
    const frame = frameOf(entry);
    const size = utf8.encode(frame).length;
    if (!state.pacer.take(size, now)) {
      wait = Math.min(wait, state.pacer.wait(size, now));
      break;
    }
    entry.tries += 1;
    entry.connection = state.connection;
    state.ws.send(frame);
  }
  if (wait !== Infinity) state.pumpTimer = setTimeout(pump, wait);
}

/**
 * After a resume replay, send what earlier sockets sent but the server never
 * acked, and what was written offline. A resend the server already holds is
 * acked again (`duplicate`), with the seq it was given the first time.
 */
function flushOutbox() {
  state.caughtUp = true;
  pump();
}

/**
 * The server acked our message with its place in the room's order: nothing to
 * send again. The pending copy stays until the room's message at that place
 * is shown (an ack may come before or after it, and be of an order the page
 * has not seen yet), so the message never leaves the page in between.
 */
function onAck(frame) {
  const entry = state.outbox.get(frame.message_id);
  if (entry === undefined || !Number.isInteger(frame.seq)) return;
  state.outbox.delete(entry.id);
  entry.epoch = epochOf(frame);
  entry.seq = frame.seq;
  if (entry.epoch === state.epoch && entry.seq <= state.lastSeq) entry.node.remove();   // shown already
  else state.acked.set(orderKey(entry.epoch, entry.seq), entry);
}

/**
 * The room's messages of order epoch up to seq are shown: the pending copy of
 * ours at seq goes. One acked below seq was skipped (no longer held by the
 * server, or its order ended before we got it): its copy stays, as sent, for
 * it is not shown otherwise.
 */
function settleAcked(epoch, seq) {
  for (const [key, entry] of state.acked) {
    if (entry.epoch !== epoch || entry.seq > seq) continue;
    state.acked.delete(key);
    if (entry.seq === seq) {
      entry.node.remove();
    } else {
      entry.node.classList.remove("pending");
      delete entry.node.dataset.pending;
      entry.node.querySelector("time").textContent = clock.format(messageTime(entry.sentAt));
    }
  }
}

/** The server refused our message: keep it visible, marked as not sent. */
function refuse(entry, reason) {
  state.outbox.delete(entry.id);
  entry.node.classList.replace("pending", "failed");
  delete entry.node.dataset.pending;
  entry.node.querySelector("time").textContent = "not sent";
  entry.node.title = reason;
}

// ---- Frames from the server -----------------------------------------------------

/**
 * The room's order is now epoch: the server lost the room's state (a restart,
 * a room it forgot, Redis keys that expired or were flushed) and counts from 1
 * again. The old order's seqs mean nothing now, and what of it we had not
 * received is gone: our messages acked in it and not shown stay, as sent.
 */
function beginOrder(epoch) {
  if (state.lastSeq > 0) {
    addSystem("The room's earlier history is gone from the server: the conversation continues from here.");
  }
  settleAcked(state.epoch, Infinity);   // acked in the old order, not shown: they never will be
  state.epoch = epoch;
  state.lastSeq = 0;
  state.replayUntil = 0;     // the old order's replay, if any, is over: a connection sends orders one by one
}

/** First frame of a connection: who we are, the room's order and seq; a replay may follow. */
function onWelcome(frame) {
  state.attempt = 0;
  state.me = typeof frame.name === "string" ? frame.name : state.name;
  showIdentity();
  setMembers(frame.members);
  // Another epoch: a new order, which the server replays from its start. The
  // same one with a lower seq: this server lags; what it owes us we have.
  const epoch = epochOf(frame);
  if (epoch !== "" && epoch !== state.epoch) beginOrder(epoch);
  setStatus("online", "Online");
  state.pacer = new Pacer(frame.limits, performance.now());
  state.replayUntil = frame.seq;
  if (state.lastSeq >= state.replayUntil) flushOutbox();   // else after the replay
}

/** A message of the room: shown once, in its order, whether replayed or live. */
function onMessage(frame) {
  if (!Number.isInteger(frame.seq)) return;
  const epoch = epochOf(frame);
  if (epoch !== state.epoch) beginOrder(epoch);
  if (frame.seq <= state.lastSeq) return;   // already shown
  if (state.lastSeq > 0 && frame.seq > state.lastSeq + 1) {
    const missed = frame.seq - state.lastSeq - 1;
    addSystem(`${missed} earlier message${missed === 1 ? " is" : "s are"} no longer kept by the server.`);
  }
  state.lastSeq = frame.seq;
  settleAcked(epoch, frame.seq);
  addMessage(frame);
  if (!state.caughtUp && state.lastSeq >= state.replayUntil) flushOutbox();
}

/** The server refused a frame of ours; the connection stays open. */
function onError(frame) {
  const reason = frame.reason || frame.code || "refused";
  // Without a message_id the error is about the oldest message this socket
  // sent and the server has not answered: it answers a connection's frames in order.
  let entry = state.outbox.get(frame.message_id);
  if (entry === undefined) {
    entry = [...state.outbox.values()].find((e) => e.connection === state.connection);
  }
  if (frame.code === "unavailable" || frame.code === "rate_limit") {
    // Not refused for good: it stays in the outbox and goes again. Over the rate,
    // everything waits until the server's bucket holds a token (retry_after).
    if (entry !== undefined) entry.connection = 0;
    if (frame.code === "unavailable") {
      if (entry !== undefined) entry.retryAt = performance.now() + UNAVAILABLE_RETRY_MS;
      showNotice(`Delayed: ${reason}. Trying again shortly.`, "info");
    } else if (state.pacer !== null) {
      const ms = typeof frame.retry_after === "number" && frame.retry_after >= 0
        ? frame.retry_after * 1000 : RETRY_AFTER_DEFAULT_MS;
      state.pacer.hold(ms, performance.now());
    }
    pump();
    return;
  }
  showNotice(`Message not sent: ${reason}`);
  if (entry !== undefined) refuse(entry, reason);
}

/** Dispatch one text frame from the server by its type. */
function onFrame(data) {
  let frame;
  try { frame = JSON.parse(data); } catch { return; }
  if (frame === null || typeof frame !== "object") return;
  switch (frame.type) {
    case "welcome": onWelcome(frame); break;
    case "message": onMessage(frame); break;
    case "ack": onAck(frame); break;
    case "members": setMembers(frame.count); break;
    case "error": onError(frame); break;
    default: break;   // newer server, newer frame types: ignore
  }
}

// ---- Connection: connect, close, backoff -------------------------------------------

/** ws(s)://<this host>/ws/<room>?name=..&since=..&epoch=..&client=.. */
function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({ name: state.name, since: String(state.lastSeq) });
  if (state.epoch) query.set("epoch", state.epoch);   // the order since counts in
  query.set("client", state.clientId);
  return `${scheme}//${location.host}/ws/${encodeURIComponent(state.room)}?${query}`;
}

/** Cancel a pending reconnect and its countdown. */
function stopTimers() {
  clearTimeout(state.retryTimer);
  clearInterval(state.countdownTimer);
  state.retryTimer = 0;
  state.countdownTimer = 0;
}

/** Open a socket to the room; its events count only while it is the current one. */
function connect() {
  stopTimers();
  const ws = new WebSocket(socketUrl());
  state.ws = ws;
  state.connection += 1;
  state.caughtUp = false;
  setStatus(state.attempt ? "reconnecting" : "connecting",
            state.attempt ? "Reconnecting\u2026" : "Connecting\u2026");
  ws.addEventListener("message", (ev) => { if (state.ws === ws) onFrame(ev.data); });
  ws.addEventListener("close", (ev) => { if (state.ws === ws) onClose(ev); });
}

/** Drop the current socket without reacting to its close event. */
function disconnect() {
  stopTimers();
  const ws = state.ws;
  state.ws = null;
  state.caughtUp = false;
  if (ws) ws.close(CLOSE_NORMAL);
}

/** A fresh socket now, without waiting for a backoff. */
function reconnectNow() {
  disconnect();
  connect();
}

/** Exponential backoff with jitter, so a restarted server is not hit by every page at once. */
function backoffMs(attempt) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return ceiling / 2 + Math.random() * ceiling / 2;
}

/** "Reconnecting in N s" while a reconnect is scheduled. */
function showCountdown() {
  const seconds = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
  setStatus("reconnecting", `Reconnecting in ${seconds}\u00a0s`);
}

/** Try again after the next backoff step. */
function scheduleReconnect() {
  const delay = backoffMs(state.attempt);
  state.attempt += 1;
  state.retryAt = Date.now() + delay;
  state.retryTimer = setTimeout(connect, delay);
  state.countdownTimer = setInterval(showCountdown, 250);
  showCountdown();
}

/** The socket closed: say why when it matters, and reconnect after a backoff. */
function onClose(ev) {
  state.ws = null;
  state.caughtUp = false;
  ui.members.classList.add("stale");   // the last count we heard, no longer live
  if (ev.code === CLOSE_POLICY) {
    // Closed over the rate limit: what it refused is still in the outbox, and goes
    // again after the reconnect, at the pace the new welcome announces.
    showNotice(`The server closed the connection: ${ev.reason || "policy violation"}. Reconnecting.`, "info");
  } else if (ev.code === CLOSE_TRY_AGAIN_LATER) {
    showNotice("The server asked us to reconnect; catching up on missed messages.", "info");
  } else if (ev.reason) {
    showNotice(`Connection closed (${ev.code}): ${ev.reason}`, "info");
  }
  scheduleReconnect();
}

// ---- Room and name ------------------------------------------------------------------

/** The room named by the URL hash, or the default room for an empty or invalid one. */
function roomFromHash() {
  let room = "";
  try { room = decodeURIComponent(location.hash.slice(1)); } catch { room = ""; }
  if (room === "") return DEFAULT_ROOM;
  if (ROOM_PATTERN.test(room)) return room;
  showNotice(`"${room}" is not a room name (1-64 of A-Z a-z 0-9 _ . -); showing #${DEFAULT_ROOM}.`);
  return DEFAULT_ROOM;
}

/** Leave the current room (its unsent messages with it) and join another. */
function enterRoom(room) {
  disconnect();
  state.room = room;
  state.epoch = "";
  state.lastSeq = 0;
  state.attempt = 0;
  state.outbox.clear();
  state.acked.clear();
  ui.room.textContent = room;
  document.title = `#${room} \u00b7 scale-chat`;
  clearMessages();
  setMembers(0);
  ui.members.textContent = "\u2013";
  if (state.name) connect();
}

/** The name and room dialog. */
function openJoin() {
  ui.joinName.value = state.name;
  ui.joinRoom.value = state.room;
  showJoinUrl();
  ui.joinCancel.hidden = !state.name;
  ui.join.showModal();
}

/** The address to share for the room typed in the dialog. */
function showJoinUrl() {
  const room = ROOM_PATTERN.test(ui.joinRoom.value) ? ui.joinRoom.value : DEFAULT_ROOM;
  ui.joinUrl.textContent = `${location.origin}/#${room}`;
}

/** Dialog submitted: remember the name, then enter the room or reconnect under the new name. */
function onJoin(ev) {
  ev.preventDefault();
  const name = ui.joinName.value.trim().slice(0, NAME_MAX);
  const room = ui.joinRoom.value.trim() || DEFAULT_ROOM;
  if (!name || !ROOM_PATTERN.test(room)) return;
  ui.join.close();
  const renamed = name !== state.name;
  state.name = name;
  remember(NAME_KEY, name);
  showIdentity();
  if (room !== state.room) {
    location.hash = room;   // hashchange enters the room
  } else if (renamed || !state.ws) {
    state.attempt = 0;
    reconnectNow();         // same room: `since` keeps the conversation whole
  }
}

// ---- Composer -------------------------------------------------------------------------

/** Composer submitted: the text goes to the outbox (and out, when online). */
function onSubmit(ev) {
  ev.preventDefault();
  const text = ui.text.value;
  if (!text.trim() || !state.name) return;
  queueMessage(text);
  ui.text.value = "";
  ui.text.focus();
}

/** Enter sends, Shift+Enter starts a new line. */
function onComposerKey(ev) {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    ui.composer.requestSubmit();
  }
}

// ---- Start ---------------------------------------------------------------------------

/** Wire up the page and join the room in the URL (asking for a name first if needed). */
function start() {
  state.name = recall(NAME_KEY).slice(0, NAME_MAX);
  ui.composer.addEventListener("submit", onSubmit);
  ui.text.addEventListener("keydown", onComposerKey);
  ui.joinForm.addEventListener("submit", onJoin);
  ui.joinRoom.addEventListener("input", showJoinUrl);
  ui.joinCancel.addEventListener("click", () => ui.join.close());
  ui.me.addEventListener("click", openJoin);
  ui.retry.addEventListener("click", () => { state.attempt = 0; reconnectNow(); });
  ui.log.addEventListener("scroll", onScroll, { passive: true });
  new ResizeObserver(followEnd).observe(ui.messages);
  window.addEventListener("hashchange", () => {
    const room = roomFromHash();
    if (room !== state.room) enterRoom(room);
  });
  // Back from a network outage: no need to wait out the backoff.
  window.addEventListener("online", () => { if (state.retryTimer) connect(); });
  showIdentity();
  enterRoom(roomFromHash());
  if (!state.name) {
    setStatus("offline", "Pick a name to join");
    openJoin();
  }
}

start();
