// Fine-tuning: upload a dataset, start a QLoRA or LongLoRA job, follow its events and loss
// curves live, list its checkpoints, cancel it, and try the result in the playground.
import { get, post } from './api.js';
import { h, s, clear, bytes, when, fmt } from './dom.js';
import { lineChart } from './charts.js';

const POLL_MS = 2000;
const FINAL = new Set(['succeeded', 'failed', 'cancelled']);
const HYPER = [
  ['r', 'rank r', 'number'], ['lora_alpha', 'lora_alpha', 'number'], ['learning_rate', 'learning rate', 'number'],
  ['num_epochs', 'epochs', 'number'], ['max_steps', 'max steps', 'number'], ['batch_size', 'batch size', 'number'],
  ['gradient_accumulation_steps', 'grad. accumulation', 'number'], ['checkpoint_steps', 'checkpoint every', 'number'],
  ['context_length', 'context length (LongLoRA)', 'number'],
];
let app;
const el = {};
let timer = null;
let job = null; // {id, events: Map id -> event, newestId}

export function mount(section, shared) {
  app = shared;
  el.dataset = h('input', { type: 'file', id: 'ft-dataset', accept: '.jsonl,.json,.txt' });
  el.datasetMsg = h('p', { class: 'message', id: 'ft-dataset-message', role: 'status' });
  el.drop = h('label', { class: 'drop admin', id: 'ft-drop',
    ondragover: (e) => e.preventDefault(),
    ondrop: (e) => { e.preventDefault(); el.dataset.files = e.dataTransfer.files; } },
  'Drop a JSONL dataset here, or click to choose', el.dataset);
  el.train = h('select', { id: 'ft-training-file' });
  el.valid = h('select', { id: 'ft-validation-file' });
  el.method = h('select', { id: 'ft-method' }, h('option', { value: 'qlora' }, 'QLoRA'), h('option', { value: 'longlora' }, 'LongLoRA'));
  el.suffix = h('input', { id: 'ft-suffix', placeholder: 'suffix (optional)' });
  el.hyper = Object.fromEntries(HYPER.map(([k, , type]) => [k, h('input', { id: `ft-${k}`, type, step: 'any', placeholder: 'default' })]));
  el.extra = h('textarea', { id: 'ft-extra', rows: 2, placeholder: 'more hyperparameters as JSON, e.g. {"lora_dropout": 0.05}' });
  el.startMsg = h('p', { class: 'message', id: 'ft-start-message', role: 'status' });
  el.jobs = h('tbody', { id: 'ft-jobs' });
  el.job = h('div', { class: 'card', id: 'ft-job', hidden: true });
  section.append(
    h('h1', {}, 'Fine-tuning'),
    h('div', { class: 'grid' },
      h('form', { class: 'card', id: 'ft-upload-form', onsubmit: uploadDataset },
        h('h2', {}, 'Dataset'), h('p', { class: 'read-only-note' }, 'Uploading and starting jobs need the admin key.'),
        el.drop, h('button', { type: 'submit', class: 'admin', id: 'ft-upload' }, 'Upload dataset'), el.datasetMsg),
      h('form', { class: 'card', id: 'ft-start-form', onsubmit: startJob },
        h('h2', {}, 'New job'),
        h('div', { class: 'form-grid' },
          h('label', {}, 'method', el.method), h('label', {}, 'suffix', el.suffix),
          h('label', {}, 'training file', el.train), h('label', {}, 'validation file', el.valid),
          HYPER.map(([k, text]) => h('label', {}, text, el.hyper[k]))),
        el.extra, h('button', { type: 'submit', class: 'primary admin', id: 'ft-start' }, 'Start job'), el.startMsg)),
    h('div', { class: 'split' },
      h('div', { class: 'card scroll' }, h('h2', {}, 'Jobs'),
        h('table', { class: 'table' }, h('thead', {}, h('tr', {}, ['job', 'status', 'model', 'created'].map((c) => h('th', {}, c)))), el.jobs)),
      el.job),
  );
}

let filesAsked = 0;

async function loadFiles() {
  const asked = ++filesAsked;
  try {
    const files = await get('/v1/files?purpose=fine-tune&limit=100');
    if (asked !== filesAsked) return; // a newer listing is on its way
    const opts = (none) => [h('option', { value: '' }, none), files.data.map((f) => h('option', { value: f.id }, `${f.filename} · ${bytes(f.bytes)} · ${f.id}`))];
    const keep = [el.train.value, el.valid.value];
    clear(el.train, opts('choose a file'));
    clear(el.valid, opts('none: hold out 10%'));
    [el.train.value, el.valid.value] = keep;
    if (!el.train.value && files.data.length) el.train.value = files.data[0].id;
  } catch (err) {
    clear(el.train, h('option', { value: '' }, `files unavailable: ${err.message}`));
  }
}

async function loadJobs() {
  try {
    const jobs = await get('/v1/fine_tuning/jobs?limit=20');
    clear(el.jobs, jobs.data.map((j) => h('tr', { 'data-job': j.id, tabindex: 0, onclick: () => select(j.id) },
      h('td', { class: 'name' }, j.id), h('td', { class: `status ${j.status}` }, j.status),
      h('td', { class: 'name' }, j.fine_tuned_model || j.model), h('td', {}, when(j.created_at)))));
  } catch (err) {
    clear(el.jobs, h('tr', {}, h('td', { colspan: 4 }, err.message)));
  }
}

async function uploadDataset(event) {
  event.preventDefault();
  const file = el.dataset.files[0];
  el.datasetMsg.className = 'message';
  if (!file) { el.datasetMsg.textContent = 'Choose a JSONL file first.'; return; }
  const form = new FormData();
  form.set('purpose', 'fine-tune');
  form.set('file', file, file.name);
  el.datasetMsg.textContent = 'Uploading…';
  try {
    const f = await post('/v1/files', { form });
    el.datasetMsg.textContent = `Stored ${f.filename} as ${f.id}.`;
    await loadFiles();
    el.train.value = f.id;
  } catch (err) {
    el.datasetMsg.className = 'message error';
    el.datasetMsg.textContent = err.message;
  }
}

function hyperparameters() {
  const hp = {};
  for (const [k] of HYPER) if (el.hyper[k].value !== '') hp[k] = Number(el.hyper[k].value);
  const extra = el.extra.value.trim();
  if (extra) Object.assign(hp, JSON.parse(extra));
  return hp;
}

async function startJob(event) {
  event.preventDefault();
  el.startMsg.className = 'message';
  let hp;
  try { hp = hyperparameters(); } catch (err) {
    el.startMsg.className = 'message error';
    el.startMsg.textContent = `The extra hyperparameters are not valid JSON: ${err.message}`;
    return;
  }
  if (!el.train.value) {
    el.startMsg.className = 'message error';
    el.startMsg.textContent = 'Choose a training file (upload a dataset first).';
    return;
  }
  const body = { model: app.info?.model, training_file: el.train.value, method: { type: el.method.value, hyperparameters: hp } };
  if (el.valid.value) body.validation_file = el.valid.value;
  if (el.suffix.value.trim()) body.suffix = el.suffix.value.trim();
  try {
    const j = await post('/v1/fine_tuning/jobs', { json: body });
    el.startMsg.textContent = `Started ${j.id}.`;
    await loadJobs();
    select(j.id);
  } catch (err) {
    el.startMsg.className = 'message error';
    el.startMsg.textContent = err.message;
  }
}

function select(id) {
  job = { id, events: new Map(), newestId: null };
  el.status = h('p', { id: 'ft-job-status' });
  el.chart = s('svg', { id: 'ft-loss-chart', role: 'img', 'aria-label': 'training and validation loss' });
  el.events = h('ol', { class: 'events', id: 'ft-events' });
  el.ckpts = h('tbody', { id: 'ft-checkpoints' });
  el.jobMsg = h('p', { class: 'message', role: 'status' });
  el.cancel = h('button', { class: 'danger admin', id: 'ft-cancel', disabled: !app.admin, onclick: cancel }, 'Cancel');
  el.try = h('button', { id: 'ft-try', hidden: true }, 'Try it');
  clear(el.job, h('h2', { class: 'name' }, id), el.status, h('div', { class: 'actions' }, el.cancel, el.try), el.jobMsg,
    h('h3', {}, 'Loss'), el.chart, h('h3', {}, 'Checkpoints'),
    h('table', { class: 'table' }, h('thead', {}, h('tr', {}, ['checkpoint', 'step', 'train loss', 'valid loss'].map((c) => h('th', {}, c)))), el.ckpts),
    h('h3', {}, 'Events'), el.events);
  el.job.hidden = false;
  poll();
}

async function newEvents(id) {
  // Newest first: page back until an event already seen.
  const fresh = [];
  let after = null;
  for (;;) {
    const q = new URLSearchParams({ limit: '100' });
    if (after) q.set('after', after);
    const page = await get(`/v1/fine_tuning/jobs/${id}/events?${q}`);
    const unseen = page.data.filter((e) => !job.events.has(e.id));
    fresh.push(...unseen);
    if (!page.has_more || unseen.length < page.data.length || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return fresh.reverse(); // oldest first
}

async function poll() {
  if (!job) return;
  const current = job;
  try {
    const [j, events, ckpts] = await Promise.all([
      get(`/v1/fine_tuning/jobs/${current.id}`), newEvents(current.id),
      get(`/v1/fine_tuning/jobs/${current.id}/checkpoints?limit=100`),
    ]);
    if (job !== current) return;
    for (const e of events) {
      current.events.set(e.id, e);
      el.events.prepend(h('li', { class: e.level }, h('span', { class: 'muted' }, when(e.created_at)), ' ', e.message));
    }
    const status = `${j.status}${j.fine_tuned_model ? ` → ${j.fine_tuned_model}` : ''}` +
      `${j.trained_tokens ? ` · ${j.trained_tokens.toLocaleString()} tokens trained` : ''}` +
      `${j.error?.message ? ` · ${j.error.message}` : ''}`;
    el.status.textContent = status;
    el.status.dataset.status = j.status;
    el.cancel.hidden = FINAL.has(j.status);
    if (j.status === 'succeeded' && j.fine_tuned_model) {
      el.try.hidden = false;
      el.try.onclick = () => app.go('playground', { models: [j.model, j.fine_tuned_model] });
    }
    clear(el.ckpts, ckpts.data.map((c) => h('tr', {}, h('td', { class: 'name' }, c.id), h('td', {}, c.step_number),
      h('td', {}, fmt(c.metrics?.train_loss, 4)), h('td', {}, fmt(c.metrics?.valid_loss, 4)))));
    drawLoss();
    if (FINAL.has(j.status)) loadJobs();
  } catch (err) {
    el.jobMsg.textContent = err.message;
  }
}

function drawLoss() {
  // Step and checkpoint metrics carry a step; the final summary (no step) is left out.
  const all = [...job.events.values()].filter((e) => e.type === 'metrics' && Number.isFinite(e.data?.step));
  const train = all.filter((e) => e.data.learning_rate != null && e.data.train_loss != null)
    .map((e) => [e.data.step, e.data.train_loss]).sort((a, b) => a[0] - b[0]);
  const valid = all.filter((e) => e.data.valid_loss != null)
    .map((e) => [e.data.step, e.data.valid_loss]).sort((a, b) => a[0] - b[0]);
  el.chart.dataset.trainPoints = String(train.length);
  el.chart.dataset.validPoints = String(valid.length);
  lineChart(el.chart, [
    { name: 'train loss', cls: 's-gen', points: train, dots: train.length < 40 },
    { name: 'valid loss', cls: 's-e2e', points: valid, dots: true },
  ], { xMin: 0, xFormat: (v) => `step ${Math.round(v)}` });
}

async function cancel() {
  try {
    await post(`/v1/fine_tuning/jobs/${job.id}/cancel`);
    el.jobMsg.textContent = 'Cancellation requested.';
  } catch (err) {
    el.jobMsg.textContent = err.message;
  }
}

export function show() {
  for (const b of document.querySelectorAll('#page-finetune .admin')) if (b.tagName === 'BUTTON') b.disabled = !app.admin;
  loadFiles();
  loadJobs();
  if (!timer) timer = setInterval(() => { if (job) poll(); }, POLL_MS);
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

export function refresh() {
  show();
}
