// Playground: one prompt or chat message, up to four columns (the base or an adapter), streamed
// side by side with the same sampling parameters; TTFT and tokens/s per column; copy as code.
import { get, stream } from './api.js';
import { h, clear, fmt } from './dom.js';

const MAX_COLUMNS = 4;
let app;
const el = {};
let columns = [];
let pending = null;
let controller = null;

export function mount(section, shared) {
  app = shared;
  el.mode = h('select', { id: 'pg-mode' }, h('option', { value: 'completion' }, 'completion'), h('option', { value: 'chat' }, 'chat'));
  el.prompt = h('textarea', { id: 'pg-prompt', rows: 4, placeholder: 'Prompt' });
  el.maxTokens = h('input', { id: 'pg-max-tokens', type: 'number', min: 1, value: '32' });
  el.temperature = h('input', { id: 'pg-temperature', type: 'number', min: 0, max: 2, step: '0.1', value: '0' });
  el.topP = h('input', { id: 'pg-top-p', type: 'number', min: 0, max: 1, step: '0.05', value: '1' });
  el.seed = h('input', { id: 'pg-seed', type: 'number', placeholder: 'none' });
  el.run = h('button', { id: 'pg-run', class: 'primary', onclick: run }, 'Run');
  el.stop = h('button', { id: 'pg-stop', onclick: () => controller?.abort() }, 'Stop');
  el.add = h('button', { id: 'pg-add', onclick: () => addColumn('') }, 'Add column');
  el.names = h('datalist', { id: 'pg-models' });
  el.columns = h('div', { class: 'columns', id: 'pg-columns' });
  el.code = h('pre', { class: 'code', id: 'pg-code', hidden: true });
  section.append(
    h('h1', {}, 'Playground'),
    h('div', { class: 'card' },
      h('div', { class: 'toolbar' }, h('label', {}, 'mode ', el.mode), h('label', {}, 'max tokens ', el.maxTokens),
        h('label', {}, 'temperature ', el.temperature), h('label', {}, 'top p ', el.topP), h('label', {}, 'seed ', el.seed)),
      el.prompt,
      h('div', { class: 'toolbar' }, el.run, el.stop, el.add)),
    el.names, el.columns, el.code,
  );
  const models = pending || [app.info?.model || ''];
  pending = null;
  for (const m of models) addColumn(m);
}

// Called before navigating here (from "Try in playground" or a finished job).
export function prepare({ models }) {
  if (!el.columns) { pending = models; return; }
  clear(el.columns);
  columns = [];
  for (const m of models) addColumn(m);
}

function addColumn(model) {
  if (columns.length >= MAX_COLUMNS) return;
  const col = {};
  col.model = h('input', { class: 'pg-model', list: 'pg-models', value: model || '', placeholder: 'base model or adapter', oninput: () => suggest(col.model.value) });
  col.output = h('pre', { class: 'output pg-output' });
  col.stats = h('p', { class: 'muted pg-stats' });
  col.root = h('div', { class: 'card column' },
    h('div', { class: 'toolbar' }, col.model,
      h('button', { title: 'remove column', onclick: () => removeColumn(col) }, '×')),
    col.output, col.stats,
    h('div', { class: 'toolbar' },
      h('button', { class: 'pg-curl', onclick: () => showCode(col, 'curl') }, 'Copy as curl'),
      h('button', { class: 'pg-python', onclick: () => showCode(col, 'python') }, 'Copy as Python')));
  columns.push(col);
  el.columns.append(col.root);
  el.add.disabled = columns.length >= MAX_COLUMNS;
}

function removeColumn(col) {
  columns = columns.filter((c) => c !== col);
  col.root.remove();
  el.add.disabled = columns.length >= MAX_COLUMNS;
}

async function suggest(text) {
  try {
    const page = await get(`/v1/adapters?limit=20&search=${encodeURIComponent(text)}`);
    const names = [app.info?.model, ...page.data.map((a) => a.id)].filter(Boolean);
    clear(el.names, names.map((n) => h('option', { value: n })));
  } catch { /* suggestions are optional */ }
}

function body(model) {
  const chat = el.mode.value === 'chat';
  const b = { model, max_tokens: Number(el.maxTokens.value) || 16, temperature: Number(el.temperature.value), top_p: Number(el.topP.value) };
  if (el.seed.value !== '') b.seed = Number(el.seed.value);
  if (chat) b.messages = [{ role: 'user', content: el.prompt.value }];
  else b.prompt = el.prompt.value;
  return { path: chat ? '/v1/chat/completions' : '/v1/completions', body: b };
}

async function runColumn(col, signal) {
  const { path, body: b } = body(col.model.value.trim() || app.info?.model);
  col.output.textContent = '';
  col.output.classList.remove('error');
  col.root.dataset.state = 'running';
  col.stats.textContent = 'waiting…';
  const start = performance.now();
  let first = null;
  let tokens = 0;
  try {
    await stream(path, { ...b, stream: true, stream_options: { include_usage: true } }, (ev) => {
      if (ev.usage) tokens = ev.usage.completion_tokens;
      const choice = ev.choices?.[0];
      const text = choice ? (choice.text ?? choice.delta?.content ?? '') : '';
      if (!text) return;
      first ??= performance.now();
      col.output.textContent += text;
      col.stats.textContent = `TTFT ${fmt((first - start) / 1000, 2)} s`;
    }, signal);
    const end = performance.now();
    const rate = first && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
    col.stats.textContent = `TTFT ${fmt(first ? (first - start) / 1000 : null, 2)} s · ${tokens} tokens · ${fmt(rate)} tokens/s`;
    col.root.dataset.state = 'done';
  } catch (err) {
    col.output.classList.add('error');
    col.output.textContent = err.name === 'AbortError' ? 'stopped' : err.message;
    col.stats.textContent = '';
    col.root.dataset.state = 'error';
  }
}

async function run() {
  controller?.abort();
  controller = new AbortController();
  el.run.disabled = true;
  await Promise.all(columns.map((c) => runColumn(c, controller.signal)));
  el.run.disabled = false;
}

// A Python literal for a JSON value (JSON's string escapes are valid in Python strings).
function pyLiteral(v, indent = '') {
  if (v === null) return 'None';
  if (v === true || v === false) return v ? 'True' : 'False';
  if (typeof v !== 'object') return JSON.stringify(v);
  const inner = `${indent}    `;
  if (Array.isArray(v)) return `[${v.map((x) => pyLiteral(x, indent)).join(', ')}]`;
  const items = Object.entries(v).map(([k, x]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(x, inner)},`);
  return `{\n${items.join('\n')}\n${indent}}`;
}

function showCode(col, kind) {
  const { path, body: b } = body(col.model.value.trim() || app.info?.model);
  const url = `${location.origin}${path}`;
  const json = JSON.stringify(b, null, 2);
  const code = kind === 'curl'
    ? `curl -s ${url} \\\n  -H "Authorization: Bearer $API_KEY" -H 'content-type: application/json' \\\n  -d '${json.replaceAll("'", "'\\''")}'`
    : `import os\n\nimport httpx\n\nbody = ${pyLiteral(b)}\n` +
      `r = httpx.post("${url}", json=body,\n               headers={"Authorization": f"Bearer {os.environ['API_KEY']}"}, timeout=60)\nprint(r.json())`;
  el.code.textContent = code;
  el.code.hidden = false;
  navigator.clipboard?.writeText(code).catch(() => { /* shown on the page either way */ });
}
