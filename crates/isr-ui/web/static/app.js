// The isr web console: polls /api/state, posts operations, shows the VM's screen through noVNC.
import RFB from '/novnc/core/rfb.js';

const $ = (sel) => document.querySelector(sel);
let selected = null;
let rfb = null;
let rfbParcel = null;
let lastState = null;

const mib = (b) => (b / 1048576).toFixed(1) + ' MiB';
const ago = (unix) => {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  return s < 120 ? s + 's ago' : s < 7200 ? Math.round(s / 60) + 'm ago' : s < 172800 ? Math.round(s / 3600) + 'h ago' : Math.round(s / 86400) + 'd ago';
};

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: { 'X-Isr-Ui': '1', 'Content-Type': 'application/json', ...(opts.headers || {}) } });
  const text = await r.text();
  const body = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error(body && body.error ? body.error : r.status + ' ' + text);
  return body;
}

function showError(msg) {
  const e = $('#error');
  e.textContent = msg || '';
  e.hidden = !msg;
}

function renderParcels(state) {
  const tbody = $('#parcels tbody');
  tbody.replaceChildren();
  for (const p of state.parcels) {
    const tr = document.createElement('tr');
    tr.dataset.name = p.name;
    if (p.name === selected) tr.classList.add('selected');
    const lock = p.lock ? `${p.lock.holder} (${ago(p.lock.since_unix)})` : '—';
    const here = p.busy ? `${p.state} · ${p.busy}…` : p.state;
    const chunks = p.state === 'absent' ? '' : `${p.chunks.cached} / ${p.chunks.dirty} / ${p.chunks.total}`;
    for (const v of [p.name, p.head ?? '?', lock, here, chunks, p.state === 'absent' ? '' : mib(p.pending_upload_bytes)]) {
      const td = document.createElement('td');
      td.textContent = v;
      tr.appendChild(td);
    }
    tr.addEventListener('click', () => select(p.name));
    tbody.appendChild(tr);
  }
}

function renderJobs(state) {
  const ul = $('#jobs');
  ul.replaceChildren();
  for (const j of state.jobs.slice().reverse().slice(0, 12)) {
    const li = document.createElement('li');
    li.dataset.job = j.id;
    li.dataset.state = j.state;
    let text = `${j.op} ${j.parcel}: `;
    if (j.state === 'running') text += 'running';
    else if (j.state === 'done') text += j.message;
    else if (j.state === 'failed') { text += j.message; li.classList.add('failed'); }
    else text += 'cancelled';
    li.append(text);
    for (const t of j.state === 'running' ? j.tasks : []) {
      const bar = document.createElement('progress');
      bar.max = t.total_bytes || 1;
      bar.value = t.done_bytes;
      const eta = t.eta_secs == null ? '' : `, ${Math.ceil(t.eta_secs)} s left`;
      li.append(document.createElement('br'), `${t.what} `, bar, ` ${mib(t.done_bytes)} / ${mib(t.total_bytes)}, ${mib(t.bytes_per_sec)}/s${eta}`);
    }
    if (j.cancellable) {
      const b = document.createElement('button');
      b.textContent = 'Cancel';
      b.addEventListener('click', () => api(`/api/jobs/${j.id}/cancel`, { method: 'POST' }).catch((e) => showError(e.message)));
      li.append(' ', b);
    }
    ul.appendChild(li);
  }
}

function renderDetail(state) {
  const p = state.parcels.find((x) => x.name === selected);
  $('#detail').hidden = !p;
  if (!p) return;
  $('#detail-name').textContent = p.name;
  const busy = !!p.busy;
  const enable = {
    checkout: !busy && p.state === 'absent',
    resume: !busy && p.state !== 'running',
    suspend: p.state === 'running',
    poweroff: p.state === 'running',
    hoard: !busy && p.state !== 'running',
    discard: !busy && p.state === 'modified',
    checkin: !busy && (p.state === 'modified' || p.state === 'unmodified'),
    rollback: !busy && p.state !== 'running' && p.state !== 'modified',
  };
  for (const b of document.querySelectorAll('#detail button[data-op]')) b.disabled = !enable[b.dataset.op];
  $('#screen-box').hidden = !p.screen;
  if (p.screen && rfbParcel !== p.name) connectScreen(p.name);
  if (!p.screen && rfbParcel === p.name) disconnectScreen();
}

function connectScreen(name) {
  disconnectScreen();
  const url = `ws://${location.host}/api/parcels/${encodeURIComponent(name)}/vnc`;
  try {
    rfb = new RFB($('#screen'), url, { wsProtocols: ['binary'] });
  } catch (e) {
    showError('screen: ' + e.message);
    return;
  }
  rfb.scaleViewport = true;
  rfb.focusOnClick = true;
  rfbParcel = name;
  rfb.addEventListener('disconnect', () => {
    if (rfbParcel === name) { rfb = null; rfbParcel = null; }
  });
}

function disconnectScreen() {
  if (rfb) { try { rfb.disconnect(); } catch (_) {} }
  rfb = null;
  rfbParcel = null;
}

async function loadVersions(name) {
  const tbody = $('#versions tbody');
  try {
    const vs = await api(`/api/parcels/${encodeURIComponent(name)}/versions`);
    tbody.replaceChildren();
    for (const v of vs.slice().reverse()) {
      const tr = document.createElement('tr');
      for (const c of [v.version, ago(v.created_unix), v.client, mib(v.bytes_uploaded), v.comment]) {
        const td = document.createElement('td');
        td.textContent = c;
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
  } catch (e) { showError(e.message); }
}

const COLORS = { '.': '#d9dde2', c: '#4f8cc9', d: '#e0533c', u: '#3aa757', z: '#ffffff' };

function drawMap(title, states) {
  const width = 256;
  const rows = Math.max(1, Math.ceil(states.length / width));
  const canvas = document.createElement('canvas');
  canvas.className = 'chunkmap';
  canvas.width = width;
  canvas.height = rows;
  canvas.style.width = width * 2 + 'px';
  canvas.style.height = Math.max(rows * 2, 4) + 'px';
  canvas.title = `${title}: ${states.length} chunks`;
  const ctx = canvas.getContext('2d');
  for (let i = 0; i < states.length; i++) {
    ctx.fillStyle = COLORS[states[i]] || '#000';
    ctx.fillRect(i % width, Math.floor(i / width), 1, 1);
  }
  const label = document.createElement('div');
  label.textContent = `${title} (${states.length} chunks)`;
  return [label, canvas];
}

async function loadChunks(name, state) {
  const box = $('#chunkmaps');
  const p = state.parcels.find((x) => x.name === name);
  if (!p || p.state === 'absent') { box.replaceChildren('not on this client'); return; }
  try {
    const m = await api(`/api/parcels/${encodeURIComponent(name)}/chunks`);
    box.replaceChildren(...drawMap('disk', m.disk), ...(m.memory ? drawMap('memory', m.memory) : []));
  } catch (e) { box.replaceChildren(e.message); }
}

function select(name) {
  selected = name;
  showError('');
  if (lastState) { renderParcels(lastState); renderDetail(lastState); loadChunks(name, lastState); }
  loadVersions(name);
}

async function operate(op) {
  if (!selected) return;
  const body = {};
  if (op === 'checkin') body.message = $('#message').value;
  if (op === 'rollback') body.version = Number($('#rollback-version').value);
  showError('');
  try {
    await api(`/api/parcels/${encodeURIComponent(selected)}/${op}`, { method: 'POST', body: JSON.stringify(body) });
  } catch (e) { showError(e.message); }
  refresh();
}

let tick = 0;
let jobsSeen = new Map();
async function refresh() {
  try {
    const state = await api('/api/state');
    lastState = state;
    $('#who').textContent = state.user;
    $('#offline').hidden = !state.offline;
    $('#offline').textContent = state.offline ? 'offline: ' + state.offline : '';
    renderParcels(state);
    renderJobs(state);
    renderDetail(state);
    // A job that just ended: its error goes to the detail pane, and versions and chunks are reloaded.
    for (const j of state.jobs) {
      const before = jobsSeen.get(j.id);
      if (before === 'running' && j.state !== 'running') {
        if (j.state === 'failed' && j.parcel === selected) showError(j.message);
        if (j.parcel === selected) { loadVersions(selected); loadChunks(selected, state); }
      }
      jobsSeen.set(j.id, j.state);
    }
    if (selected && ++tick % 5 === 0) loadChunks(selected, state);
  } catch (e) {
    $('#offline').hidden = false;
    $('#offline').textContent = 'console: ' + e.message;
  }
}

for (const b of document.querySelectorAll('#detail button[data-op]')) b.addEventListener('click', () => operate(b.dataset.op));
refresh();
setInterval(refresh, 1000);
