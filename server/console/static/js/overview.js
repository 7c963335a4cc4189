// Overview: the model and device, the page pool split, queues, throughput and latency, live.
import { get } from './api.js';
import { h, s, clear, bytes, fmt } from './dom.js';
import { lineChart, stackedBar } from './charts.js';

const POLL_MS = 2000;
let app;
let timer = null;
const el = {};

export function mount(section, shared) {
  app = shared;
  el.model = h('dl', { class: 'facts', id: 'model-facts' });
  el.poolBar = s('svg', { id: 'pool-bar', role: 'img', 'aria-label': 'page pool split now' });
  el.pool = s('svg', { id: 'pool-chart', role: 'img', 'aria-label': 'page pool over time' });
  el.queue = s('svg', { id: 'queue-chart', role: 'img', 'aria-label': 'running and waiting' });
  el.tokens = s('svg', { id: 'tokens-chart', role: 'img', 'aria-label': 'tokens per second' });
  el.latency = s('svg', { id: 'latency-chart', role: 'img', 'aria-label': 'latency' });
  el.now = h('p', { class: 'muted', id: 'stats-now' });
  el.resident = h('p', { id: 'adapters-resident' });
  el.hot = h('tbody', { id: 'hot-adapters' });
  section.append(
    h('h1', {}, 'Overview'),
    h('div', { class: 'grid' },
      h('div', { class: 'card' }, h('h2', {}, 'Model'), el.model),
      h('div', { class: 'card' }, h('h2', {}, 'Page pool now'), el.poolBar, el.now,
        h('h2', {}, 'Adapters'), el.resident,
        h('table', { class: 'table' }, h('thead', {}, h('tr', {}, h('th', {}, 'hot adapters (last 5 min)'), h('th', {}, 'requests'))), el.hot))),
    h('div', { class: 'grid charts' },
      h('div', { class: 'card' }, h('h2', {}, 'Pool pages in use (last 5 min)'), el.pool),
      h('div', { class: 'card' }, h('h2', {}, 'Requests running / waiting'), el.queue),
      h('div', { class: 'card' }, h('h2', {}, 'Tokens per second'), el.tokens),
      h('div', { class: 'card' }, h('h2', {}, 'Latency (s)'), el.latency)),
  );
}

function showModel(info) {
  const rows = [
    ['model', info.model], ['architecture', info.architecture],
    ['parameters', info.num_parameters?.toLocaleString()], ['layers', info.num_layers],
    ['quantize', info.quantize], ['dtype', info.dtype], ['device', info.device],
    ['max model len', info.max_model_len], ['max batch', info.max_num_seqs],
    ['max LoRA rank', info.max_lora_rank], ['device adapter slots', info.max_loras],
    ['LoRA backend', info.lora_backend], ['adapters', info.adapters_registered],
    ['pool', `${info.pool.pages} pages x ${bytes(info.pool.page_bytes)}`], ['version', info.version],
  ];
  clear(el.model, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? '–')]));
}

async function poll() {
  try {
    const [info, stats] = await Promise.all([get('/info'), get('/v1/stats?seconds=300')]);
    app.info = info;
    showModel(info);
    const p = info.pool;
    stackedBar(el.poolBar, [
      { name: 'KV cache', cls: 's-kv', value: p.kv_pages },
      { name: 'cached prefixes', cls: 's-cached', value: p.cached_kv_pages },
      { name: 'adapters', cls: 's-adapter', value: p.adapter_pages },
      { name: 'free', cls: 's-free', value: p.free_pages },
    ]);
    draw(stats);
  } catch (err) {
    el.now.textContent = `Stats unavailable: ${err.message}`;
  }
}

function draw(stats) {
  const pts = stats.data;
  const t0 = pts.length ? pts[pts.length - 1].time : Date.now() / 1000;
  const x = (p) => p.time - t0; // seconds before now (negative)
  const opts = { xMin: -300, xMax: 0, xFormat: (v) => (v === 0 ? 'now' : `${Math.round(v / 60)} min`) };
  const series = (key, name, cls) => ({ name, cls, points: pts.map((p) => [x(p), p[key]]) });
  // Pages in use: free pages dwarf them on a big pool (the bar above shows the whole split).
  lineChart(el.pool, [
    series('kv_pages', 'KV cache', 's-kv'),
    series('cached_pages', 'cached prefixes', 's-cached'),
    series('adapter_pages', 'adapters', 's-adapter'),
  ], opts);
  lineChart(el.queue, [series('running', 'running', 's-run'), series('waiting', 'waiting', 's-wait')], opts);
  lineChart(el.tokens, [
    series('generation_tokens_per_s', 'generated', 's-gen'),
    series('prompt_tokens_per_s', 'prompt', 's-prompt'),
  ], opts);
  lineChart(el.latency, [
    series('mean_ttft_s', 'time to first token', 's-ttft'),
    series('mean_e2e_latency_s', 'request', 's-e2e'),
  ], opts);
  const last = pts[pts.length - 1];
  if (last) {
    el.resident.textContent = `${app.info?.adapters_registered ?? '–'} registered · ${last.adapters_device} in the device pool · ` +
      `${last.adapters_host} in host memory`;
  }
  clear(el.hot, stats.hot_adapters.length
    ? stats.hot_adapters.map((a) => h('tr', {}, h('td', { class: 'name' }, a.adapter), h('td', {}, a.requests)))
    : h('tr', {}, h('td', { class: 'muted', colspan: 2 }, 'no adapter requests lately')));
  el.now.textContent = last
    ? `${last.running} running, ${last.waiting} waiting, ${fmt(last.generation_tokens_per_s)} tokens/s ` +
      `(sampled every ${stats.interval_s} s, ${pts.length} points)`
    : 'Collecting the first samples…';
}

export function show() {
  if (!timer) {
    poll();
    timer = setInterval(poll, POLL_MS);
  }
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

export function refresh() {
  if (timer) poll();
}
