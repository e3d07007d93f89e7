// The /logs WebSocket as both pages keep it (app.js: the main page; admin.js: the operator's):
// one current socket whose events count, and the back-off between reconnects.

export const RECONNECT_MIN_MS = 500;
export const RECONNECT_MAX_MS = 10_000;

// Opens /logs on this page's own host (wss: behind https) as state.socket. A replaced socket
// may still fire events; only the current one's reach `on`.
export function openLogsSocket(state, on) {
  clearTimeout(state.reconnectTimer);
  const url = new URL('/logs', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const socket = new WebSocket(url);
  state.socket = socket;
  socket.addEventListener('open', () => socket === state.socket && on.open());
  socket.addEventListener('message', (event) => socket === state.socket && on.message(event));
  socket.addEventListener('close', () => socket === state.socket && on.close());
  return socket;
}

// 0.5 s doubling to 10 s, ±20 % jitter so many tabs do not return all at once.
export function reconnectDelay(attempt) {
  const base = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** attempt);
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

// A server message: a JSON object with a string type, or null for anything else (the protocol
// is JSON text only; what is not ours to judge is ignored).
export function parseMessage(data) {
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    return null;
  }
  return message && typeof message === 'object' && typeof message.type === 'string' ? message : null;
}

// The connection badge: its state (the stylesheet keys on data-state) and what it says.
export function showConnection(badge, connState, text) {
  badge.dataset.state = connState;
  badge.textContent = text;
}
