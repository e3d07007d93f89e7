// Callgate's web page: check a number's call limit, place a call, follow it live.
//
// One WebSocket (/logs, SPEC §6) carries everything; it reconnects with back-off and, once
// back, re-checks the number and resubscribes to the call this tab is following. Text from
// the server only ever reaches the page through textContent / new Option(), never as HTML.

import { RECONNECT_MAX_MS, openLogsSocket, parseMessage, reconnectDelay, showConnection } from './logs-socket.js';

const CHECK_DEBOUNCE_MS = 300;
const MIN_DIALLABLE = 8; // fewer keys than any full number in US/AU/IN: not worth asking yet
const MAX_DIALLABLE = 15; // E.164's longest
const CALL_STORAGE_KEY = 'callgate.call'; // {callSid, token} of the call being followed
const TERMINAL_STATUSES = new Set(['ended', 'busy', 'no-answer', 'failed', 'canceled']);
const INVALID_NUMBER_REASONS = new Set(['missing', 'unparseable', 'invalid', 'region_not_allowed', 'not_callable']);

const OFFLINE_TEXT = 'Offline — will check again once reconnected';

const STATUS_TEXT = {
  idle: 'No call yet',
  starting: 'Starting the call…',
  resuming: 'Reconnecting to your call…',
  queued: 'Queued — placing the call…',
  ringing: 'Ringing…',
  'in-progress': 'Answered',
  connected: 'Connected — the agent is on the line',
  ended: 'Call ended',
  busy: 'The line was busy',
  'no-answer': 'No answer',
  failed: 'The call failed',
  canceled: 'The call was canceled',
};

const REASON_TEXT = {
  missing: 'Enter a phone number',
  unparseable: 'That is not a phone number',
  invalid: 'That is not a valid phone number',
  region_not_allowed: 'Only US, Australian or Indian numbers can be called',
  not_callable: 'That number cannot be called',
  limit_reached: 'This number has reached its call limit',
  cooldown: 'Calls to this number must be further apart',
  limiter_unavailable: 'Call limits cannot be checked right now',
};

// Why a call ended (call.status_changed reason), in words; unknown reasons are shown as sent.
const END_REASON_TEXT = {
  caller_hangup: 'The other side hung up',
  stream_closed: 'The call was disconnected',
  ended_by_client: 'You hung up',
  agent_ended: 'The agent ended the call',
  time_limit: 'The call reached its time limit',
  model_failed: 'The agent stopped responding, so the call was ended',
  model_unavailable: 'The agent could not be reached, so the call was ended',
  shutdown: 'The server restarted during the call',
};

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $('conn'),
  form: $('call-form'),
  phone: $('phone'),
  indicator: $('limit-indicator'),
  limitText: $('limit-text'),
  countdown: $('limit-countdown'),
  limitMessage: $('limit-message'),
  scenario: $('scenario'),
  scenarioDescription: $('scenario-description'),
  fields: $('scenario-fields'),
  voice: $('voice'),
  turnstile: $('turnstile-widget'), // not id="turnstile": that would shadow window.turnstile
  callBtn: $('call-btn'),
  hangupBtn: $('hangup-btn'),
  callHint: $('call-hint'),
  error: $('error'),
  status: $('call-status'),
  detail: $('call-detail'),
  transcript: $('transcript'),
  transcriptEmpty: $('transcript-empty'),
};

// Everything the page knows, in one place. `call` outlives the call's end so late
// transcript events still land; `call.active` says whether it can still be hung up.
const state = {
  socket: null,
  reconnectAttempt: 0,
  reconnectTimer: 0,
  scenarios: [],
  limit: 'empty', // mirrors #limit-indicator[data-state]
  checkTimer: 0, // debounce, or a delayed re-check
  countdownTimer: 0,
  resetTime: 0,
  zeroRechecks: 0, // re-checks at a countdown's end that still said "limited" (clock skew)
  call: null, // {callSid, token, active}
  starting: false, // call.start sent, no answer yet
  resuming: false, // call.subscribe sent, no event yet
  hangingUp: false,
  turnstile: null, // {token, widgetId} when the server asks for Turnstile
  errorSource: '',
};

// --- the socket ------------------------------------------------------------------------

function isOpen() {
  return state.socket?.readyState === WebSocket.OPEN;
}

function send(message) {
  if (!isOpen()) return false;
  state.socket.send(JSON.stringify(message));
  return true;
}

function connect() {
  showConnection(ui.conn, 'connecting', 'Connecting…');
  openLogsSocket(state, { open: onOpen, message: onMessage, close: onClose });
}

function onOpen() {
  state.reconnectAttempt = 0;
  showConnection(ui.conn, 'open', 'Connected');
  checkNumber();
  if (state.call?.active) resubscribe();
  updateControls();
}

function onClose() {
  const delay = reconnectDelay(state.reconnectAttempt++);
  showConnection(ui.conn, 'closed', `Disconnected — retrying in ${Math.ceil(delay / 1000)} s`);
  state.reconnectTimer = setTimeout(connect, delay);
  stopLimitTimers();
  showLimit('offline', OFFLINE_TEXT);
  if (state.starting) {
    // The server may or may not have placed the call; without a callSid we cannot follow it.
    state.starting = false;
    setStatus('idle', 'Call not confirmed');
    showError('The connection dropped while starting the call. If the phone rings, the call was placed.');
  }
  state.resuming = false;
  state.hangingUp = false;
  updateControls();
}

// Come back at once when the network or the tab does, instead of waiting out the back-off.
function reconnectNow() {
  if (state.socket && state.socket.readyState !== WebSocket.CLOSED) return;
  connect();
}

function onMessage(event) {
  const message = parseMessage(event.data);
  // Unknown types are ignored: the server may grow new events.
  if (message) HANDLERS[message.type]?.(message);
}

const HANDLERS = {
  rate_limit_status: onRateLimitStatus,
  rate_limit_exceeded: onRateLimitExceeded,
  'call.status_changed': onStatusChanged,
  'transcript.delta': onTranscriptDelta,
  'transcript.done': onTranscriptDone,
  function_call: onFunctionCall,
  error: onServerError,
};

// --- the rate-limit indicator ----------------------------------------------------------

function currentNumber() {
  return ui.phone.value.trim();
}

// A light local check only: count the keys one would dial (letters count, for vanity
// numbers). The server parses properly and has the last word.
function precheck(number) {
  if (!number) return ['empty', 'Enter a number to see how many calls it has left'];
  const keys = number.replace(/[^0-9a-z]/gi, '').length;
  if (keys < MIN_DIALLABLE) return ['empty', 'Keep typing — that is too short for a full number'];
  if (keys > MAX_DIALLABLE) return ['invalid', 'That has too many digits for a phone number'];
  return null;
}

function onPhoneInput() {
  stopLimitTimers();
  state.zeroRechecks = 0;
  const early = precheck(currentNumber());
  if (early) return showLimit(...early);
  // "checking" at once: the Call button must not act on the previous number's answer.
  showLimit('checking', 'Checking…');
  state.checkTimer = setTimeout(checkNumber, CHECK_DEBOUNCE_MS);
}

function checkNumber() {
  stopLimitTimers();
  const number = currentNumber();
  const early = precheck(number);
  if (early) return showLimit(...early);
  if (!isOpen()) return showLimit('offline', OFFLINE_TEXT);
  showLimit('checking', 'Checking…');
  send({ type: 'rate_limit_check', phoneNumber: number });
}

function onRateLimitStatus(message) {
  // The server echoes the number as sent; an answer for an older keystroke is stale.
  if (message.phoneNumber !== currentNumber()) return;
  if (message.allowed) {
    state.zeroRechecks = 0;
    if (message.remaining === 1) return showLimit('last', 'Last call available');
    const left = Number.isFinite(message.remaining) && message.remaining > 1
      ? `${message.remaining} calls left` : 'Calls available';
    return showLimit('ok', left);
  }
  showRefusal(message);
}

function onRateLimitExceeded(message) {
  if (state.starting) {
    state.starting = false;
    setStatus('idle', 'Call not placed');
    showError(sentence(message.message || REASON_TEXT[message.reason] || 'This number has reached its call limit'));
  }
  if (message.phoneNumber === currentNumber()) showRefusal(message);
  updateControls();
}

function showRefusal(message) {
  stopLimitTimers();
  const text = sentence(message.message || REASON_TEXT[message.reason] || 'This number cannot be called right now');
  if (INVALID_NUMBER_REASONS.has(message.reason)) return showLimit('invalid', text);
  if (message.reason === 'limiter_unavailable') {
    showLimit('invalid', text);
    state.checkTimer = setTimeout(checkNumber, 5000); // transient: ask again shortly
    return;
  }
  // limit_reached, cooldown, or anything else with a time to wait for.
  showLimit('limited', 'Limit reached — try again in ', { message: text });
  startCountdown(Number(message.resetTime) || Date.now());
}

function showLimit(limitState, text, { message = '' } = {}) {
  state.limit = limitState;
  ui.indicator.dataset.state = limitState;
  ui.limitText.textContent = text;
  ui.countdown.hidden = limitState !== 'limited';
  if (ui.countdown.hidden) ui.countdown.textContent = '';
  ui.limitMessage.textContent = message;
  ui.limitMessage.hidden = !message;
  updateControls();
}

function startCountdown(resetTime) {
  state.resetTime = resetTime;
  tickCountdown();
  state.countdownTimer = setInterval(tickCountdown, 1000);
}

function tickCountdown() {
  const left = state.resetTime - Date.now();
  ui.countdown.textContent = formatCountdown(left);
  if (left > 0) return;
  clearInterval(state.countdownTimer);
  // Our clock and the server's can disagree; if the server still says "limited" at our
  // zero, ask again after a growing pause rather than every second.
  const wait = state.zeroRechecks === 0 ? 0 : Math.min(RECONNECT_MAX_MS, 1000 * 2 ** state.zeroRechecks);
  state.zeroRechecks += 1;
  state.checkTimer = setTimeout(checkNumber, wait);
}

function formatCountdown(ms) {
  const seconds = Math.max(0, Math.ceil(ms / 1000));
  const mm = String(Math.floor(seconds / 60)).padStart(2, '0');
  const ss = String(seconds % 60).padStart(2, '0');
  return `${mm}:${ss}`;
}

function stopLimitTimers() {
  clearTimeout(state.checkTimer);
  clearInterval(state.countdownTimer);
}

// --- scenarios -------------------------------------------------------------------------

async function loadScenarios(attempt = 0) {
  try {
    const response = await fetch('/scenarios', { headers: { Accept: 'application/json' } });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const data = await response.json();
    // phone-screen's shape: a bare array, the default scenario first.
    showScenarios(Array.isArray(data) ? data : []);
    clearError('scenarios');
  } catch (err) {
    const delay = reconnectDelay(attempt);
    showError(`Could not load the scenarios (${err.message}). Retrying in ${Math.ceil(delay / 1000)} s.`, 'scenarios');
    setTimeout(() => loadScenarios(attempt + 1), delay);
  }
}

function showScenarios(scenarios) {
  state.scenarios = scenarios.filter((s) => s && s.id && Array.isArray(s.fields));
  ui.scenario.replaceChildren(...state.scenarios.map((s) => new Option(s.icon ? `${s.icon} ${s.name || s.id}` : s.name || s.id, s.id)));
  ui.scenario.value = state.scenarios[0]?.id ?? '';
  ui.scenario.disabled = state.scenarios.length === 0;
  showScenario();
}

function selectedScenario() {
  return state.scenarios.find((s) => s.id === ui.scenario.value);
}

function showScenario() {
  const scenario = selectedScenario();
  ui.scenarioDescription.textContent = scenario?.description ?? '';
  // Keep what was typed into a field of the same key (e.g. "company") across scenarios.
  const typed = Object.fromEntries([...fieldInputs()].map((input) => [input.name, input.value]));
  ui.fields.replaceChildren(...(scenario?.fields ?? []).map((field) => renderField(field, typed[field.key])));
  // The first voice is the scenario's default.
  const voices = scenario?.voiceOptions ?? [];
  ui.voice.replaceChildren(...voices.map((v) => new Option(v.description ? `${v.label} — ${v.description}` : v.label, v.value)));
  ui.voice.value = voices[0]?.value ?? '';
  ui.voice.disabled = voices.length === 0;
  updateControls();
}

function renderField(field, previous = '') {
  const id = `field-${field.key}`;
  const wrapper = document.createElement('div');
  wrapper.className = 'field';
  const label = document.createElement('label');
  label.htmlFor = id;
  label.textContent = field.label || field.key;
  if (field.required) {
    const mark = document.createElement('span');
    mark.className = 'required';
    mark.textContent = ' (required)';
    label.append(mark);
  }
  const input = field.type === 'select' ? renderSelect(field) : renderText(field);
  input.id = id;
  input.name = field.key;
  input.required = Boolean(field.required);
  input.dataset.field = field.key;
  input.dataset.label = field.label || field.key;
  input.dataset.minLength = String(field.validation?.minLength ?? 0);
  const choices = (field.options ?? []).map((o) => o.value);
  if (previous && (input.tagName !== 'SELECT' || choices.includes(previous))) input.value = previous;
  input.addEventListener('input', updateControls);
  wrapper.append(label, input);
  return wrapper;
}

function renderSelect(field) {
  const select = document.createElement('select');
  // A required choice starts blank so it is made on purpose; an optional one may stay blank.
  select.append(new Option(field.required ? 'Choose…' : 'No preference', ''));
  for (const option of field.options ?? []) select.append(new Option(option.label ?? option.value, option.value));
  return select;
}

function renderText(field) {
  // Long free text (a job description) gets room to be read back.
  const long = field.type === 'textarea';
  const input = document.createElement(long ? 'textarea' : 'input');
  if (long) input.rows = 4;
  else input.type = 'text';
  if (field.validation?.maxLength) input.maxLength = field.validation.maxLength;
  if (field.placeholder) input.placeholder = field.placeholder;
  input.autocomplete = 'off';
  return input;
}

function fieldInputs() {
  return ui.fields.querySelectorAll('[data-field]');
}

function scenarioConfig() {
  const config = {};
  for (const input of fieldInputs()) {
    const value = input.value.trim();
    if (value) config[input.name] = value;
  }
  return config;
}

function missingFields() {
  return [...fieldInputs()]
    .filter((input) => input.required && !input.value.trim())
    .map((input) => input.dataset.label);
}

// Fields filled in, but shorter than the scenario allows (the server would refuse them).
function tooShortFields() {
  return [...fieldInputs()]
    .filter((input) => input.value.trim() && input.value.trim().length < Number(input.dataset.minLength))
    .map((input) => `${input.dataset.label} (at least ${input.dataset.minLength} characters)`);
}

// --- the call --------------------------------------------------------------------------

// Why the Call button is disabled, or '' when it may be pressed.
function callBlocker() {
  if (!isOpen()) return 'Waiting for the connection to the server…';
  if (state.starting) return 'Starting the call…';
  if (state.call?.active) return 'A call is in progress.';
  if (!selectedScenario()) return 'Loading scenarios…';
  if (state.limit === 'empty') return 'Enter the number to call.';
  if (state.limit === 'checking') return 'Checking the number…';
  if (state.limit === 'invalid') return 'This number cannot be called.';
  if (state.limit === 'limited') return 'This number has reached its call limit.';
  if (state.limit === 'offline') return 'Waiting for the connection to the server…';
  const missing = missingFields();
  if (missing.length) return `Fill in: ${missing.join(', ')}.`;
  const short = tooShortFields();
  if (short.length) return `Too short: ${short.join(', ')}.`;
  if (state.turnstile && !state.turnstile.token) return 'Complete the human check above.';
  return '';
}

function updateControls() {
  const blocker = callBlocker();
  ui.callBtn.disabled = Boolean(blocker);
  ui.callBtn.textContent = state.starting ? 'Calling…' : 'Call';
  ui.callHint.textContent = blocker;
  ui.hangupBtn.disabled = !(state.call?.active && isOpen() && !state.hangingUp);
}

function startCall() {
  if (callBlocker()) return;
  const message = {
    type: 'call.start',
    phoneNumber: currentNumber(),
    scenarioId: ui.scenario.value,
    config: scenarioConfig(),
    voice: ui.voice.value,
  };
  if (state.turnstile) message.turnstileToken = state.turnstile.token;
  if (!send(message)) return;
  spendTurnstileToken();
  state.starting = true;
  state.call = null;
  clearError();
  clearTranscript();
  setStatus('starting');
  updateControls();
}

function hangUp() {
  if (!state.call?.active) return;
  if (send({ type: 'call.end', callSid: state.call.callSid })) {
    state.hangingUp = true;
    showDetail('Hanging up…');
    updateControls();
  }
}

function resubscribe() {
  state.resuming = true;
  send({ type: 'call.subscribe', callSid: state.call.callSid, token: state.call.token });
}

function onStatusChanged(message) {
  if (state.starting && message.callSid && message.token) adoptCall(message); // only call.start's own reply carries a token
  if (!isCurrentCall(message)) return;
  state.resuming = false;
  setStatus(message.status, message.reason);
  if (TERMINAL_STATUSES.has(message.status)) finishCall();
}

// The answer to our call.start: from now on this tab follows that call, across reloads.
function adoptCall(message) {
  state.starting = false;
  state.call = { callSid: message.callSid, token: message.token, active: true };
  sessionStorage.setItem(CALL_STORAGE_KEY, JSON.stringify({ callSid: message.callSid, token: message.token }));
  checkNumber(); // the call was charged; show what is left
}

function finishCall() {
  state.call.active = false;
  state.hangingUp = false;
  sessionStorage.removeItem(CALL_STORAGE_KEY);
  checkNumber(); // a call that never connected is refunded
  updateControls();
}

function isCurrentCall(message) {
  return Boolean(state.call) && message.callSid === state.call.callSid;
}

function setStatus(status, reason = '') {
  ui.status.dataset.status = status;
  ui.status.textContent = STATUS_TEXT[status] ?? sentence(String(status));
  showDetail(reason ? sentence(END_REASON_TEXT[reason] ?? String(reason).replaceAll('_', ' ')) : '');
}

function showDetail(text) {
  ui.detail.textContent = text;
  ui.detail.hidden = !text;
}

function onFunctionCall(message) {
  if (!isCurrentCall(message)) return;
  showDetail(`The agent used the ${message.name} tool.`);
}

function onServerError(message) {
  const text = sentence(message.message || message.code || 'Something went wrong');
  // The protocol does not say which request an error answers; our one pending request is
  // the likeliest, in this order.
  if (state.starting) {
    state.starting = false;
    setStatus('idle', 'Call not placed');
  } else if (state.resuming) {
    // The call is gone or its token expired: stop trying to follow it.
    state.resuming = false;
    state.call.active = false;
    sessionStorage.removeItem(CALL_STORAGE_KEY);
    setStatus('idle', 'Could not reconnect to the call');
  } else if (state.hangingUp) {
    state.hangingUp = false;
    showDetail('');
  } else if (state.limit === 'checking') {
    // A check answered with an error rather than a status: do not leave "Checking…" up.
    showLimit('invalid', text);
  }
  showError(text);
  updateControls();
}

function restoreCall() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(CALL_STORAGE_KEY) ?? 'null');
    if (saved?.callSid) {
      state.call = { callSid: saved.callSid, token: saved.token, active: true };
      setStatus('resuming');
    }
  } catch {
    sessionStorage.removeItem(CALL_STORAGE_KEY);
  }
}

// --- the transcript --------------------------------------------------------------------

function onTranscriptDelta(message) {
  if (!isCurrentCall(message) || typeof message.delta !== 'string') return;
  const item = transcriptItem(message);
  item.setAttribute('aria-busy', 'true'); // readers wait for the whole sentence
  keepScrolledToEnd(() => item.append(message.delta));
}

function onTranscriptDone(message) {
  if (!isCurrentCall(message)) return;
  // A turn whose words could not be transcribed still happened: say so in its place.
  const failed = message.failed === true;
  const text = failed ? '(these words could not be transcribed)' : typeof message.text === 'string' ? message.text : '';
  const existing = findItem(message.itemId);
  if (!text && !existing) return; // nothing was said; no empty bubble
  const item = existing ?? transcriptItem(message);
  keepScrolledToEnd(() => {
    item.textContent = text;
    item.classList.toggle('failed', failed);
    item.setAttribute('aria-busy', 'false');
  });
}

function findItem(itemId) {
  return [...ui.transcript.children].find((li) => li.dataset.itemId === String(itemId));
}

function transcriptItem({ itemId, role }) {
  let item = findItem(itemId);
  if (!item) {
    item = document.createElement('li');
    item.dataset.itemId = String(itemId);
    item.dataset.role = role === 'user' ? 'user' : 'assistant';
    ui.transcript.append(item);
    ui.transcriptEmpty.hidden = true;
  }
  return item;
}

// Follow new text only if the reader was already at the end, so scrolling back is possible.
function keepScrolledToEnd(change) {
  const list = ui.transcript;
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  change();
  if (atEnd) list.scrollTop = list.scrollHeight;
}

function clearTranscript() {
  ui.transcript.replaceChildren();
  ui.transcriptEmpty.hidden = false;
}

// --- errors ----------------------------------------------------------------------------

// `source` lets a later success clear only the error it is about.
function showError(text, source = '') {
  ui.error.textContent = text;
  state.errorSource = source;
}

function clearError(source) {
  if (source !== undefined && state.errorSource !== source) return;
  ui.error.textContent = '';
  state.errorSource = '';
}

// Server messages are lower-case phrases ("that is not a valid phone number").
function sentence(text) {
  const capital = capitalize(text.trim());
  return !capital || /[.!?…]$/.test(capital) ? capital : `${capital}.`;
}

function capitalize(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

// --- Cloudflare Turnstile (only when the server asks for it) ----------------------------

function setUpTurnstile() {
  const sitekey = document.body.dataset.turnstileSitekey;
  if (!sitekey) return;
  state.turnstile = { token: null, widgetId: null };
  ui.turnstile.hidden = false;
  const setToken = (token) => {
    state.turnstile.token = token;
    updateControls();
  };
  window.onCallgateTurnstile = () => {
    state.turnstile.widgetId = window.turnstile.render(ui.turnstile, {
      sitekey,
      callback: setToken,
      'expired-callback': () => setToken(null),
      'error-callback': () => {
        setToken(null);
        showError('The human check failed. Reload the page to try again.');
      },
    });
  };
  const script = document.createElement('script');
  script.src = 'https://challenges.cloudflare.com/turnstile/v0/api.js?render=explicit&onload=onCallgateTurnstile';
  script.async = true;
  script.addEventListener('error', () => showError('Could not load the human check (Cloudflare Turnstile). Reload the page to try again.'));
  document.head.append(script);
}

// A token is good for one call.start; get a fresh one for the next call.
function spendTurnstileToken() {
  if (!state.turnstile) return;
  state.turnstile.token = null;
  if (state.turnstile.widgetId !== null) window.turnstile?.reset(state.turnstile.widgetId);
}

// --- start -----------------------------------------------------------------------------

function main() {
  ui.phone.addEventListener('input', onPhoneInput);
  ui.scenario.addEventListener('change', showScenario);
  ui.form.addEventListener('submit', (event) => {
    event.preventDefault();
    startCall();
  });
  ui.hangupBtn.addEventListener('click', hangUp);
  window.addEventListener('online', reconnectNow);
  document.addEventListener('visibilitychange', () => document.visibilityState === 'visible' && reconnectNow());
  setUpTurnstile();
  restoreCall();
  updateControls();
  loadScenarios();
  connect();
}

main();
