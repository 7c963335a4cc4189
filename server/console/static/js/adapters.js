// Adapters: a server-paged, searchable list; upload by drag and drop; details; delete.
import { get, post, del } from './api.js';
import { h, clear, bytes, when } from './dom.js';

const PAGE = 50;
let app;
const el = {};
let lastId = null;
let searchTimer = null;
let dropped = [];

export function mount(section, shared) {
  app = shared;
  el.search = h('input', { type: 'search', id: 'adapter-search', placeholder: 'Search adapters by name', oninput: onSearch });
  el.count = h('span', { class: 'muted', id: 'adapter-count' });
  el.rows = h('tbody', { id: 'adapter-rows' });
  el.more = h('button', { id: 'adapter-more', onclick: () => load(false), hidden: true }, 'Load more');
  el.details = h('div', { class: 'card', id: 'adapter-details', hidden: true });
  el.name = h('input', { id: 'upload-name', placeholder: 'adapter name', required: true });
  el.files = h('input', { id: 'upload-files', type: 'file', multiple: true, onchange: () => pick([...el.files.files]) });
  el.picked = h('p', { class: 'muted', id: 'upload-picked' }, 'adapter_config.json + adapter_model.safetensors, or one .tar.gz / .zip');
  el.drop = h('label', { class: 'drop admin', id: 'upload-drop', ondragover: (e) => { e.preventDefault(); el.drop.classList.add('over'); },
    ondragleave: () => el.drop.classList.remove('over'),
    ondrop: (e) => { e.preventDefault(); el.drop.classList.remove('over'); pick([...e.dataTransfer.files]); } },
  'Drop adapter files here, or click to choose', el.files);
  el.uploadBtn = h('button', { type: 'submit', id: 'upload-submit', class: 'admin' }, 'Upload');
  el.uploadMsg = h('p', { id: 'upload-message', class: 'message', role: 'status' });
  const form = h('form', { class: 'card upload', id: 'upload-form', onsubmit: upload },
    h('h2', {}, 'Upload an adapter'), h('p', { class: 'read-only-note' }, 'Uploading needs the admin key.'),
    el.name, el.drop, el.picked, el.uploadBtn, el.uploadMsg);
  section.append(
    h('h1', {}, 'Adapters'),
    h('div', { class: 'toolbar' }, el.search, el.count),
    h('div', { class: 'split' },
      h('div', { class: 'card scroll' },
        h('table', { class: 'table', id: 'adapter-table' },
          h('thead', {}, h('tr', {}, ['name', 'rank', 'targets', 'size', 'residency', 'requests'].map((c) => h('th', {}, c)))),
          el.rows),
        el.more),
      h('div', { class: 'side' }, form, el.details)),
  );
}

function pick(files) {
  dropped = files;
  el.picked.textContent = files.length ? files.map((f) => `${f.name} (${bytes(f.size)})`).join(', ') : 'no files chosen';
}

function onSearch() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => load(true), 250);
}

function residency(r) {
  if (!r) return '';
  const where = r.device ? 'GPU' : r.host ? 'host' : 'disk';
  return r.active_requests ? `${where}, ${r.active_requests} active` : where;
}

async function load(reset) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (el.search.value) params.set('search', el.search.value);
  if (!reset && lastId) params.set('after', lastId);
  try {
    const page = await get(`/v1/adapters?${params}`);
    if (reset) clear(el.rows);
    for (const a of page.data) el.rows.append(row(a));
    lastId = page.data.length ? page.data[page.data.length - 1].id : lastId;
    el.more.hidden = !page.has_more;
    el.count.textContent = `${el.rows.children.length} of ${page.total} adapters`;
  } catch (err) {
    el.count.textContent = `Cannot list adapters: ${err.message}`;
  }
}

function row(a) {
  return h('tr', { 'data-name': a.id, tabindex: 0, onclick: () => details(a.id), onkeydown: (e) => e.key === 'Enter' && details(a.id) },
    h('td', { class: 'name' }, a.id), h('td', {}, a.max_rank !== a.rank ? `${a.rank} (max ${a.max_rank})` : a.rank),
    h('td', { class: 'targets' }, a.target_modules.join(', ')), h('td', {}, bytes(a.size_bytes)),
    h('td', {}, residency(a.residency)), h('td', {}, a.requests_served ?? ''));
}

async function details(name) {
  let a;
  try {
    a = await get(`/v1/adapters/${encodeURIComponent(name)}`);
  } catch (err) {
    clear(el.details, h('p', { class: 'error' }, err.message));
    el.details.hidden = false;
    return;
  }
  const msg = h('p', { class: 'message', id: 'delete-message', role: 'status' });
  const facts = [
    ['rank', a.rank], ['max rank', a.max_rank], ['alpha', a.alpha], ['rsLoRA', a.use_rslora ? 'yes' : 'no'],
    ['targets', a.target_modules.join(', ')], ['saved modules', a.saved_modules.join(', ') || '–'],
    ['RoPE scaling', a.rope_scaling_factor], ['size', bytes(a.size_bytes)], ['sha256', a.sha256],
    ['created', when(a.created)], ['source', a.source], ['base', a.parent], ['residency', residency(a.residency)],
  ];
  clear(el.details,
    h('h2', { id: 'details-name' }, a.id),
    h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])),
    h('div', { class: 'actions' },
      h('button', { onclick: () => app.go('playground', { models: [app.info?.model, a.id] }) }, 'Try in playground'),
      h('button', { class: 'danger admin', id: 'delete-adapter', disabled: !app.admin, onclick: () => remove(a.id, msg) }, 'Delete')),
    msg);
  el.details.hidden = false;
}

async function remove(name, msg) {
  if (!confirm(`Delete adapter ${name}? This removes its files.`)) return;
  try {
    await del(`/v1/adapters/${encodeURIComponent(name)}`);
    msg.textContent = `Deleted ${name}.`;
    el.rows.querySelector(`tr[data-name="${CSS.escape(name)}"]`)?.remove();
    el.details.hidden = true;
    load(true);
  } catch (err) {
    msg.textContent = err.message;
    msg.className = 'message error';
  }
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.set('name', el.name.value.trim());
  for (const f of dropped) form.append('files', f, f.name);
  el.uploadMsg.className = 'message';
  el.uploadMsg.textContent = 'Uploading…';
  try {
    const a = await post('/v1/adapters', { form });
    el.uploadMsg.textContent = `Registered ${a.id} (rank ${a.rank}, ${bytes(a.size_bytes)}).`;
    el.name.value = '';
    el.files.value = '';
    pick([]);
    await load(true);
    // A new adapter lists last; show it at the top until the next reload.
    if (!el.rows.querySelector(`tr[data-name="${CSS.escape(a.id)}"]`)) el.rows.prepend(row(a));
    details(a.id);
  } catch (err) {
    el.uploadMsg.className = 'message error';
    el.uploadMsg.textContent = err.message;
  }
}

export function show() {
  el.uploadBtn.disabled = !app.admin;
  load(true);
}

export function refresh() {
  el.uploadBtn.disabled = !app.admin;
  load(true);
}
