// The public API, with the key the user entered (kept in sessionStorage only).

const KEY = 'loraplex.key';

export const getKey = () => sessionStorage.getItem(KEY) || '';
export const setKey = (k) => (k ? sessionStorage.setItem(KEY, k) : sessionStorage.removeItem(KEY));

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
  get denied() { return this.status === 401 || this.status === 403; }
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  let param = null;
  try {
    const body = await res.json();
    const err = body.error;
    if (err && typeof err === 'object') { message = err.message || message; param = err.param; }
    else if (typeof err === 'string') message = err;
    else if (body.detail) message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(res.status, message, param);
}

export async function request(method, path, { json, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await failure(res);
  const type = res.headers.get('content-type') || '';
  return type.includes('application/json') ? res.json() : res.text();
}

export const get = (path, opts) => request('GET', path, opts);
export const post = (path, opts) => request('POST', path, opts);
export const del = (path, opts) => request('DELETE', path, opts);

// Whether the key may change adapters, files and jobs. An empty form makes the admin route
// answer 400 (name required) after the key check, so nothing is created.
export async function probeAdmin() {
  try {
    await post('/v1/adapters', { form: new FormData() });
    return true;
  } catch (err) {
    if (err.denied) return false;
    return err.status === 400;
  }
}

// POST a streaming request; calls onEvent(parsed JSON) per server-sent event until [DONE].
export async function stream(path, body, onEvent, signal) {
  const res = await fetch(path, {
    method: 'POST',
    headers: headers({ 'Content-Type': 'application/json' }),
    body: JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw await failure(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of chunk.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(500, event.error.message || String(event.error));
        onEvent(event);
      }
    }
  }
}
