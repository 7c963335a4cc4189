// The console's shell: the key, the reader's role, and hash routing between the four pages.
import { get, getKey, setKey, probeAdmin } from './api.js';
import * as overview from './overview.js';
import * as adapters from './adapters.js';
import * as playground from './playground.js';
import * as finetune from './finetune.js';

const PAGES = { overview, adapters, playground, finetune };

// What every page shares: the served model's info, whether the key is an admin's, navigation.
export const app = {
  info: null,
  admin: false,
  go(page, params) {
    if (params) PAGES[page].prepare?.(params);
    location.hash = `#/${page}`;
  },
  banner(message) {
    const el = document.getElementById('banner');
    el.textContent = message || '';
    el.hidden = !message;
  },
};

let current = null;
const mounted = new Set();

function route() {
  const name = (location.hash.replace(/^#\/?/, '') || 'overview').split('?')[0];
  const page = PAGES[name] ? name : 'overview';
  if (current && current !== page) PAGES[current].hide?.();
  for (const [n] of Object.entries(PAGES)) {
    document.getElementById(`page-${n}`).hidden = n !== page;
  }
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.page === page);
  }
  const section = document.getElementById(`page-${page}`);
  if (!mounted.has(page)) {
    PAGES[page].mount(section, app);
    mounted.add(page);
  }
  current = page;
  PAGES[page].show?.();
}

async function identify() {
  const role = document.getElementById('role');
  try {
    app.info = await get('/info');
    app.admin = await probeAdmin();
    role.textContent = app.admin ? 'admin' : 'read-only';
    role.className = `badge ${app.admin ? 'ok' : 'warn'}`;
    app.banner('');
  } catch (err) {
    app.admin = false;
    role.textContent = err.denied ? 'key refused' : 'offline';
    role.className = 'badge bad';
    app.banner(err.denied ? `Enter a key: ${err.message}` : `Cannot reach the server: ${err.message}`);
  }
  document.body.classList.toggle('read-only', !app.admin);
  for (const page of mounted) PAGES[page].refresh?.();
}

function init() {
  const form = document.getElementById('key-form');
  const input = document.getElementById('key-input');
  input.value = getKey();
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    await identify();
    route();
  });
  window.addEventListener('hashchange', route);
  identify().then(route);
}

init();
