// Callgate's operator page: live calls across all instances, recent outcomes, the limiter,
// and the health of the instance that answers.
//
// Fed by three things: /logs' all-calls monitor (call.subscribe {all, adminToken}: every
// call's call.status_changed, and call.details from its record), GET /admin/stats (bearer
// ADMIN_TOKEN) and GET /health, both polled. The token lives in this tab only
// (sessionStorage), never in a cookie, localStorage or a URL. As on the main page, text from
// the server only reaches the page through textContent, never as HTML.

import { openLogsSocket, parseMessage, reconnectDelay, showConnection } from './logs-socket.js';

const TOKEN_KEY = 'callgate.adminToken';
const POLL_MS = 5000;
const RECENT_MAX = 50; // ended calls kept on the page
const ANNOUNCE_CLEAR_MS = 4000;
const SLOW_DOWN_RETRY_MS = 60_000;
const REFRESH_AFTER_CHANGE_MS = 500; // a call came or went: counts and health are checked again soon
const FINAL_STATUSES = new Set(['ended', 'busy', 'no-answer', 'failed', 'canceled']);
const ANSWERED = new Set(['in-progress', 'connected']);

const STATUS_TEXT = {
  queued: 'Queued',
  ringing: 'Ringing',
  'in-progress': 'Answered',
  connected: 'Connected',
  ended: 'Ended',
  busy: 'Busy',
  'no-answer': 'No answer',
  failed: 'Failed',
  canceled: 'Canceled',
};

// call.status_changed reasons, in words; the code itself is shown beside them for the logs.
const END_REASON_TEXT = {
  caller_hangup: 'Caller hung up',
  stream_closed: 'Media stream dropped',
  ended_by_client: 'Ended from a web page',
  agent_ended: 'Agent ended it',
  time_limit: 'Session time limit',
  model_failed: 'Model failed',
  model_unavailable: 'Model unavailable',
  content_filter: 'Content filter',
  shutdown: 'Server shut down',
  instance_lost: 'Its instance was lost',
};

const DIRECTION_TEXT = { inbound: 'Inbound', 'outbound-api': 'Outbound' };

const AUTH_PROBLEMS = {
  401: 'That token was not accepted. Check the server\'s ADMIN_TOKEN and enter it again.',
  403: 'Admin routes are turned off on this server: set ADMIN_TOKEN and restart it.',
  429: 'Too many wrong tokens from this address. Wait a minute, then try again.',
};

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $('conn'),
  signOut: $('sign-out'),
  form: $('token-form'),
  token: $('token'),
  tokenBtn: $('token-btn'),
  tokenError: $('token-error'),
  dashboard: $('dashboard'),
  announce: $('announce'),
  notice: $('notice'),
  liveCount: $('live-count'),
  live: document.querySelector('#live-calls tbody'),
  liveEmpty: $('live-empty'),
  recent: document.querySelector('#recent-calls tbody'),
  recentEmpty: $('recent-empty'),
  regions: document.querySelector('#regions tbody'),
  decisions: document.querySelector('#decisions tbody'),
  decisionsEmpty: $('decisions-empty'),
  statsError: $('stats-error'),
  healthError: $('health-error'),
};

const state = {
  token: null,
  socket: null,
  reconnectAttempt: 0,
  reconnectTimer: 0,
  pollTimer: 0,
  tickTimer: 0,
  announceTimer: 0,
  live: new Map(), // callSid → call, in the order first seen
  recent: [], // ended calls, newest first
  scenarioNames: {},
  clockOffset: 0, // the server's clock minus ours (call.details' serverTime)
};

// --- signing in ------------------------------------------------------------------------

async function signIn(token) {
  showTokenError('');
  ui.tokenBtn.disabled = true;
  ui.tokenBtn.textContent = 'Checking…';
  let answer;
  try {
    answer = await getStats(token);
  } catch (err) {
    answer = { problem: `Could not reach the server (${err.message}). Try again.` };
  }
  ui.tokenBtn.disabled = false;
  ui.tokenBtn.textContent = 'Open';
  if (answer.problem) {
    if (answer.status) sessionStorage.removeItem(TOKEN_KEY); // refused, not merely unreachable
    showSignIn(answer.problem);
    return;
  }
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  ui.token.value = '';
  ui.form.hidden = true;
  ui.dashboard.hidden = false;
  ui.signOut.hidden = false;
  showStats(answer);
  connect();
  poll();
  state.tickTimer = setInterval(renderLive, 1000); // durations move on by themselves
}

// Back to the token form, forgetting the token and everything shown with it.
function signOut(problem = '') {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  const socket = state.socket;
  state.socket = null; // its close is not a drop to recover from
  socket?.close();
  clearTimeout(state.reconnectTimer);
  clearTimeout(state.pollTimer);
  clearInterval(state.tickTimer);
  state.reconnectAttempt = 0;
  state.live.clear();
  state.recent = [];
  renderLive();
  renderRecent();
  showSignIn(problem);
}

function showSignIn(problem) {
  ui.dashboard.hidden = true;
  ui.signOut.hidden = true;
  ui.form.hidden = false;
  showConnection(ui.conn, 'signed-out', 'Signed out');
  showTokenError(problem);
  ui.token.focus();
}

function showTokenError(text) {
  ui.tokenError.textContent = text;
  ui.token.setAttribute('aria-invalid', text ? 'true' : 'false');
}

// GET /admin/stats: the counts, or {problem} when the token is refused. A 503 (PostgreSQL
// away) is an answer too: it still carries this instance's fail mode.
async function getStats(token) {
  const response = await fetch('/admin/stats', {
    headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
    cache: 'no-store',
  });
  if (AUTH_PROBLEMS[response.status]) return { problem: AUTH_PROBLEMS[response.status], status: response.status };
  if (!response.ok && response.status !== 503) throw new Error(`the server answered ${response.status}`);
  return response.json();
}

// --- the all-calls monitor --------------------------------------------------------------

function connect() {
  showConnection(ui.conn, 'connecting', 'Connecting…');
  openLogsSocket(state, { open: onOpen, message: onMessage, close: onClose });
}

function onOpen() {
  const reconnected = state.reconnectAttempt > 0;
  state.reconnectAttempt = 0;
  showConnection(ui.conn, 'open', 'Live');
  if (reconnected) {
    // Events sent while we were away are lost: what we show as live is unconfirmed until the
    // server says so again (the calls live on this instance come with the subscription).
    for (const call of state.live.values()) call.stale = true;
    renderLive();
    announce('Reconnected to the live feed.');
  }
  subscribe();
}

function subscribe() {
  if (state.socket?.readyState !== WebSocket.OPEN) return;
  state.socket.send(JSON.stringify({ type: 'call.subscribe', all: true, adminToken: state.token }));
  ui.notice.textContent = '';
}

function onClose() {
  const delay = reconnectDelay(state.reconnectAttempt++);
  showConnection(ui.conn, 'closed', `Disconnected — reconnecting in ${Math.ceil(delay / 1000)} s`);
  announce('The live feed is disconnected; reconnecting.');
  state.reconnectTimer = setTimeout(connect, delay);
}

// Come back at once when the network or the tab does, instead of waiting out the back-off.
function reconnectNow() {
  if (!state.token || (state.socket && state.socket.readyState !== WebSocket.CLOSED)) return;
  connect();
}

function onMessage(event) {
  const message = parseMessage(event.data);
  if (!message) return;
  // Transcripts of every call come too; this page does not show what callers say.
  const handler = HANDLERS[message.type];
  handler?.(message);
}

const HANDLERS = {
  'call.status_changed': onStatusChanged,
  'call.details': onDetails,
  error: onServerError,
};

function findCall(callSid) {
  return state.live.get(callSid) ?? state.recent.find((call) => call.callSid === callSid);
}

function onStatusChanged(message) {
  if (typeof message.callSid !== 'string' || typeof message.status !== 'string') return;
  let call = findCall(message.callSid);
  if (!call) {
    call = { callSid: message.callSid, status: '', reason: '', details: null, stale: false, connectedLocally: 0, endedLocally: 0 };
    state.live.set(call.callSid, call);
  }
  const changed = call.status !== message.status;
  call.status = message.status;
  if (message.reason) call.reason = String(message.reason);
  call.stale = false;
  // Until its record says when (call.details follows), answered is when we heard so.
  if (ANSWERED.has(call.status) && !call.connectedLocally) call.connectedLocally = serverNow();
  if (FINAL_STATUSES.has(call.status) && state.live.has(call.callSid)) {
    state.live.delete(call.callSid);
    call.endedLocally = serverNow();
    state.recent.unshift(call);
    state.recent.length = Math.min(state.recent.length, RECENT_MAX);
  }
  if (changed) announce(`Call ending ${call.callSid.slice(-4)}: ${statusText(call)}.`);
  if (changed && (FINAL_STATUSES.has(call.status) || ANSWERED.has(call.status))) refreshSoon();
  renderLive();
  renderRecent();
}

function refreshSoon() {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(poll, REFRESH_AFTER_CHANGE_MS);
}

function onDetails(message) {
  const call = typeof message.callSid === 'string' ? findCall(message.callSid) : undefined;
  if (!call) return;
  call.details = message;
  if (Number.isFinite(message.serverTime)) state.clockOffset = message.serverTime - Date.now();
  renderLive();
  renderRecent();
}

function onServerError(message) {
  if (message.code === 'forbidden') {
    signOut('The live feed refused this token (was ADMIN_TOKEN changed?). Enter it again.');
  } else if (message.code === 'slow_down') {
    ui.notice.textContent = `${AUTH_PROBLEMS[429]} The live feed will try again in a minute.`;
    setTimeout(subscribe, SLOW_DOWN_RETRY_MS);
  } else {
    ui.notice.textContent = sentence(String(message.message || message.code || 'Something went wrong'));
  }
}

function announce(text) {
  ui.announce.textContent = text;
  clearTimeout(state.announceTimer);
  state.announceTimer = setTimeout(() => { ui.announce.textContent = ''; }, ANNOUNCE_CLEAR_MS);
}

// --- the call tables --------------------------------------------------------------------

function serverNow() {
  return Date.now() + state.clockOffset;
}

function statusText(call) {
  return STATUS_TEXT[call.status] ?? call.status;
}

function callerText(call) {
  const d = call.details;
  if (!d) return '…';
  const direction = DIRECTION_TEXT[d.direction] ?? d.direction ?? '';
  // d.number is masked by the server (+1415•••0100); the page never sees a whole number.
  return [d.number, direction, d.region].filter(Boolean).join(' · ') || '—';
}

function scenarioText(call) {
  const id = call.details?.scenarioId;
  if (!call.details) return '…';
  return id ? state.scenarioNames[id] ?? id : '—';
}

// Connected time: from the record's connectedAt to its end (or now, on the server's clock).
function durationText(call) {
  const d = call.details;
  if (!d) return '…';
  const connectedAt = Number.isFinite(d.connectedAt) ? d.connectedAt : call.connectedLocally;
  if (!connectedAt) return FINAL_STATUSES.has(call.status) ? 'Never connected' : '—';
  const end = FINAL_STATUSES.has(call.status) ? d.endedAt ?? call.endedLocally : serverNow();
  return formatDuration(end - connectedAt);
}

function formatDuration(ms) {
  const total = Math.max(0, Math.round(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

function reasonCell(call) {
  const td = document.createElement('td');
  if (!call.reason) {
    td.textContent = '—';
    return td;
  }
  const words = END_REASON_TEXT[call.reason];
  if (words) td.append(`${words} `);
  const code = document.createElement('code');
  code.textContent = call.reason;
  td.append(code);
  return td;
}

function cell(text, className = '') {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function sidCell(call) {
  const td = document.createElement('td');
  const code = document.createElement('code');
  code.className = 'sid';
  code.textContent = call.callSid;
  td.append(code);
  return td;
}

function statusCell(call) {
  const td = document.createElement('td');
  const label = document.createElement('span');
  label.className = 'pill';
  label.dataset.status = call.status;
  label.textContent = statusText(call);
  td.append(label);
  if (call.stale) td.append(' (unconfirmed since the reconnect)');
  return td;
}

function row(call, cells) {
  const tr = document.createElement('tr');
  tr.dataset.callSid = call.callSid;
  tr.dataset.status = call.status;
  if (call.stale) tr.dataset.stale = 'true';
  tr.append(...cells);
  return tr;
}

function renderLive() {
  const calls = [...state.live.values()];
  ui.live.replaceChildren(...calls.map((call) => row(call, [
    sidCell(call), cell(callerText(call)), cell(scenarioText(call)), statusCell(call),
    cell(durationText(call), 'num duration'),
  ])));
  ui.liveCount.textContent = String(calls.length);
  ui.liveEmpty.hidden = calls.length > 0;
}

function renderRecent() {
  ui.recent.replaceChildren(...state.recent.map((call) => row(call, [
    sidCell(call), cell(callerText(call)), cell(scenarioText(call)), statusCell(call), reasonCell(call),
    cell(durationText(call), 'num duration'), cell(endedText(call), 'num'),
  ])));
  ui.recentEmpty.hidden = state.recent.length > 0;
}

function endedText(call) {
  const at = call.details?.endedAt ?? call.endedLocally;
  return at ? new Date(at - state.clockOffset).toLocaleTimeString() : '—';
}

// --- the limiter and health -------------------------------------------------------------

async function poll() {
  clearTimeout(state.pollTimer);
  const token = state.token;
  if (!token) return;
  await Promise.all([pollStats(token), pollHealth()]);
  if (state.token === token) state.pollTimer = setTimeout(poll, POLL_MS);
}

async function pollStats(token) {
  try {
    const answer = await getStats(token);
    if (state.token !== token) return;
    if (answer.problem) {
      if (answer.status === 429) return showProblem(ui.statsError, answer.problem);
      return signOut(answer.problem);
    }
    showStats(answer);
  } catch (err) {
    showProblem(ui.statsError, `Could not load the limiter's counts (${err.message}); showing the last ones.`);
  }
}

function showStats(stats) {
  showProblem(ui.statsError, stats.error ? `${sentence(String(stats.error))} Counts need PostgreSQL; the fail mode below is this instance's.` : '');
  setFact('limiter-database', stats.database === 'ok' ? 'Reachable' : 'Unavailable', stats.database === 'ok' ? 'ok' : 'bad');
  setFact('limiter-fail-mode', failModeText(stats.failMode), stats.database === 'ok' ? '' : 'bad');
  if (Number.isFinite(stats.limit)) {
    setFact('limiter-rule', `${stats.limit} calls per number per ${formatWindow(stats.windowMs)}`);
  }
  if (Number.isFinite(stats.callsInWindow)) setFact('limiter-calls', String(stats.callsInWindow));
  if (Number.isFinite(stats.numbersAtLimit)) setFact('limiter-at-limit', String(stats.numbersAtLimit));
  setFact('limiter-pending', String(stats.pending ?? 0), stats.pending ? 'warn' : '');
  if (Number.isFinite(stats.instancesAlive)) setFact('health-instances', String(stats.instancesAlive));
  if (stats.byRegion && typeof stats.byRegion === 'object') {
    ui.regions.replaceChildren(...Object.entries(stats.byRegion).map(([region, counts]) => {
      const tr = document.createElement('tr');
      tr.append(cell(region), cell(String(counts.callsInWindow), 'num'), cell(String(counts.numbersAtLimit), 'num'),
        cell(String(counts.rows), 'num'));
      return tr;
    }));
  }
  const decisions = Array.isArray(stats.decisions) ? stats.decisions : [];
  ui.decisions.replaceChildren(...decisions.map((d) => {
    const tr = document.createElement('tr');
    tr.dataset.result = String(d.result);
    tr.append(cell(String(d.op)), cell(String(d.result)), cell(String(d.source)), cell(String(d.count), 'num'));
    return tr;
  }));
  ui.decisionsEmpty.hidden = decisions.length > 0;
}

function failModeText(mode) {
  const words = {
    memory: 'memory — while PostgreSQL is away, the same rule in this process',
    closed: 'closed — while PostgreSQL is away, every call is refused',
    open: 'open — while PostgreSQL is away, every call is allowed',
  };
  return words[mode] ?? String(mode ?? '?');
}

function formatWindow(ms) {
  if (!Number.isFinite(ms)) return '?';
  if (ms % 3_600_000 === 0) return ms === 3_600_000 ? 'hour' : `${ms / 3_600_000} hours`;
  if (ms % 60_000 === 0) return ms === 60_000 ? 'minute' : `${ms / 60_000} minutes`;
  return `${ms / 1000} s`;
}

async function pollHealth() {
  try {
    const response = await fetch('/health', { headers: { Accept: 'application/json' }, cache: 'no-store' });
    const health = await response.json();
    if (health.status === 'draining') {
      setFact('health-status', 'Draining — shutting down, refusing new calls', 'bad');
    } else {
      const words = { healthy: 'Healthy', degraded: 'Degraded — PostgreSQL is not answering' };
      setFact('health-status', words[health.status] ?? String(health.status), health.status === 'healthy' ? 'ok' : 'bad');
      setFact('health-database', health.database === 'ok' ? 'Reachable' : 'Unavailable', health.database === 'ok' ? 'ok' : 'bad');
      setFact('health-calls', String(health.activeSessions));
      setFact('health-sockets', String(health.rateLimiting?.activeConnections ?? '?'));
      setFact('health-uptime', formatDuration((health.uptime ?? 0) * 1000));
      setFact('health-version', String(health.version ?? '?'));
    }
    setFact('health-checked', new Date().toLocaleTimeString());
    showProblem(ui.healthError, '');
  } catch (err) {
    setFact('health-status', 'Not answering', 'bad');
    showProblem(ui.healthError, `The health check failed (${err.message}).`);
  }
}

function setFact(id, text, tone = '') {
  const dd = $(id);
  dd.textContent = text;
  if (tone) dd.dataset.tone = tone;
  else delete dd.dataset.tone;
}

function showProblem(element, text) {
  element.textContent = text;
  element.hidden = !text;
}

function sentence(text) {
  const t = text.trim();
  const capital = t ? t[0].toUpperCase() + t.slice(1) : t;
  return !capital || /[.!?…]$/.test(capital) ? capital : `${capital}.`;
}

// --- start -----------------------------------------------------------------------------

async function loadScenarioNames() {
  try {
    const response = await fetch('/scenarios', { headers: { Accept: 'application/json' } });
    const list = await response.json();
    for (const s of Array.isArray(list) ? list : []) {
      if (s && typeof s.id === 'string') state.scenarioNames[s.id] = typeof s.name === 'string' ? s.name : s.id;
    }
    renderLive();
    renderRecent();
  } catch {
    // Scenario ids are shown instead of names.
  }
}

function main() {
  ui.form.addEventListener('submit', (event) => {
    event.preventDefault();
    const token = ui.token.value.trim();
    if (!token) return showTokenError('Enter the admin token.');
    signIn(token);
  });
  ui.signOut.addEventListener('click', () => signOut());
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', () => document.visibilityState === 'visible' && reconnectNow());
  renderLive();
  renderRecent();
  loadScenarioNames();
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
  else showSignIn('');
}

main();
