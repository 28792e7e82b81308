/*
 * Driftgate operator console: a hash-routed single-page app over the fleet server's REST API
 * (/api/v1). No framework, no build step, nothing fetched from elsewhere: the server embeds
 * this file, and it must work on a fleet network with no internet.
 *
 * Layout of this file: helpers (escaping, formatting) · API client and session · router and
 * polling · charts · pages (overview, devices, device, models, rollouts, rollout, drift) · boot.
 *
 * How pages update: each page builds its static scaffold once (forms, filters, selects) and
 * its data regions are re-rendered on every poll (3 s, paused while the tab is hidden). A region
 * is only rewritten when its HTML changed, so form input, focus and scroll position survive.
 *
 * Every string from the API goes through esc(), via the h`` template tag, which escapes each
 * interpolated value unless it is already-built markup (raw()).
 *
 * What it reads from the API (besides whoami, models, rollouts and audit):
 *  - GET /api/v1/fleet: the overview's counts and per-model compliance, computed on the server
 *    against the server-side assignments (a device that never connected, or has not accepted
 *    its directive, counts as behind). The overview names devices that are not on target only
 *    while the whole fleet fits in one small page (FLEET_NAMES_MAX); it never lists a large one.
 *  - GET /api/v1/devices?label=&presence=&model=&version=&q=&offset=&limit=: the devices page
 *    fetches only the page it shows (PAGE_SIZE rows), filtered on the server, with `total`;
 *    each device carries its `assignments` (the target the server asked for). The models page
 *    asks for a few names per running version (model=&version=&limit=), the drift page for a
 *    small sample to learn the label keys; nothing downloads every device.
 *  - GET /api/v1/models/{name}/{version}/profile: the reference profile (cached per version, it
 *    never changes): feature names, the reference histogram, and per-feature scores (PSI over
 *    the threshold calibrated for the window's sample count, as protocol/src/drift.rs `score`
 *    and rollout_runner.rs `drift_score` compute them).
 *  - GET /api/v1/devices/{id}/items?kind=K&limit=N&newest=true (and after_id= for what came
 *    since): the device charts, events and the drift page's recent windows.
 *
 * Still missing (the console says so where it matters):
 *  1. Per-feature counts in GET …/drift ({"features": [{"index", "psi", "counts", …}]}): the
 *     server merges every window's counts but returns only the scores, so the drift page rebuilds
 *     the "current" histogram from the newest drift items of a few devices (drift items are large:
 *     about 11 KiB each for a 64-feature model). A filter by model/release/window on the items
 *     endpoint would also help: the newest N drift items mix window lengths and versions.
 *  2. The number of devices a rollout's selector matched, on GET /rollouts/{id} (it is only in
 *     the rollout_created audit entry's details.devices, which the stage bars read).
 *  3. A compliance filter on GET /devices (?compliance=behind&model=M): the overview could then
 *     name the devices behind in a fleet of any size, and the devices page filter on it.
 *  4. The prediction's max-probability PSI in GET …/drift (only prediction_psi is returned), so
 *     the per-device score there covers the class histogram but not the confidence histogram.
 */
'use strict';

(() => {
  // ---- constants ------------------------------------------------------------------------

  const POLL_MS = 3000;
  const PAGE_SIZE = 50;
  const TOKEN_KEY = 'driftgate.token';
  const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };
  const IN_PROGRESS = new Set(['downloading', 'verifying', 'staging', 'self_test']);
  const ACTIVE_PHASES = new Set(['running', 'paused', 'rolling_back']);
  // Which operator command each rollout phase accepts (mirrors rollout/engine.rs `command`).
  const COMMAND_PHASES = {
    pause: ['running'],
    resume: ['paused'],
    abort: ['running', 'paused'],
    rollback: ['running', 'paused', 'aborted', 'completed'],
  };
  const MAX_POINTS = 600; // newest telemetry/health items per device chart: ~10 min at 1 report/s
  const RECENT_EVENTS = 200; // newest events per device (the table shows 50)
  const RECENT_EVICTIONS = 50;
  const DRIFT_ITEMS = 30; // newest drift items per followed device: they are large (counts per feature)
  const DRIFT_ITEMS_EVERY_MS = 10000; // and are fetched again at most this often
  const DRIFT_DEVICES = 5; // devices whose drift items the drift page follows
  const COHORT_CHART_VALUES = 8; // cohorts (label values) drawn in the drift-over-time-by-cohort charts
  const COHORT_DEVICES = 3; // highest-scoring devices followed per cohort for those charts
  const COHORT_BUCKET_MS = 10000; // shortest time bucket of those charts (longer when windows are)
  const DRIFT_TABLE_ROWS = 50; // devices (and cohorts) in the drift tables and heat map
  const FLEET_NAMES_MAX = 100; // the overview names devices off target only in a fleet this small
  const MODEL_NAMES = 8; // device names per running version on the models page
  const LABEL_SAMPLE = 100; // devices sampled for the drift page's label keys
  const FILTER_DEBOUNCE_MS = 300;
  const COMPLIANCE = ['on_target', 'updating', 'failed', 'behind'];

  // ---- helpers: escaping and markup -----------------------------------------------------

  /** Markup that is already safe (built by h``). */
  class Raw {
    constructor(s) { this.s = s; }
    toString() { return this.s; }
  }
  const raw = (s) => new Raw(String(s));

  /** The one escaping helper: text → HTML text or attribute value (always quote attributes). */
  function esc(v) {
    if (v === null || v === undefined) return '';
    return String(v).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  }

  function piece(v) {
    if (v instanceof Raw) return v.s;
    if (Array.isArray(v)) return v.map(piece).join('');
    if (v === null || v === undefined || v === false) return '';
    return esc(v);
  }

  /** Template tag: every interpolation is escaped unless it is Raw (or an array of Raw). */
  function h(strings, ...values) {
    let out = strings[0];
    values.forEach((v, i) => { out += piece(v) + strings[i + 1]; });
    return new Raw(out);
  }

  const $ = (sel, root = document) => root.querySelector(sel);

  /** Rewrites a region only when its markup changed; keeps <details data-key> open states. */
  function setHTML(el, markup) {
    if (!el) return;
    const next = String(markup);
    if (el._html === next) return;
    const open = new Set([...el.querySelectorAll('details[open][data-key]')].map((d) => d.dataset.key));
    el.innerHTML = next;
    el._html = next;
    if (open.size) el.querySelectorAll('details[data-key]').forEach((d) => { if (open.has(d.dataset.key)) d.open = true; });
  }

  const link = (path) => '#/' + path.map(encodeURIComponent).join('/');

  // ---- helpers: formatting --------------------------------------------------------------

  const pad = (n) => String(n).padStart(2, '0');
  function fmtTime(ms) {
    if (!ms) return '—';
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtClock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function ago(ms) {
    if (!ms) return 'never';
    const s = Math.round((Date.now() - ms) / 1000);
    if (s < 0) return 'just now';
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }
  function fmtDuration(secs) {
    if (secs === null || secs === undefined) return '—';
    if (secs < 90) return `${Math.round(secs)} s`;
    if (secs < 5400) return `${Math.round(secs / 60)} min`;
    return `${(secs / 3600).toFixed(1)} h`;
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return '—';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
  }
  function fmtNum(v, digits = 2) {
    if (v === null || v === undefined || Number.isNaN(v)) return '—';
    if (Number.isInteger(v)) return v.toLocaleString('en');
    const a = Math.abs(v);
    if (a >= 1000) return Math.round(v).toLocaleString('en');
    if (a >= 100) return v.toFixed(Math.min(digits, 1));
    if (a >= 0.01 || a === 0) return v.toFixed(digits);
    return v.toExponential(1);
  }
  const fmtUs = (us) => (us === null || us === undefined ? '—' : us >= 1000 ? `${fmtNum(us / 1000)} ms` : `${fmtNum(us, 0)} µs`);
  const shortHash = (s, n = 12) => (s ? h`<code title="${s}">${s.slice(0, n)}…</code>` : '—');
  const plural = (n, one, many = one + 's') => `${typeof n === 'number' ? n.toLocaleString('en') : n} ${n === 1 ? one : many}`;

  function labelsText(labels) {
    return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
  }
  function labelChips(labels) {
    const e = Object.entries(labels || {});
    if (!e.length) return h`<span class="muted">none</span>`;
    return e.map(([k, v]) => h`<span class="chip">${k}=${v}</span>`);
  }

  const phaseBadge = (phase, id) => h`<span class="badge phase-${phase}"${id ? raw(` id="${esc(id)}"`) : ''}>${String(phase || 'unknown').replace(/_/g, ' ')}</span>`;

  function presenceOf(d) {
    if (d.revoked_at_ms) return 'revoked';
    if (d.presence === 'online' || d.presence === 'offline') return d.presence;
    return 'never';
  }
  const presenceBadge = (p) => h`<span class="badge presence-${p}">${p === 'never' ? 'never seen' : p}</span>`;
  const lastSeen = (d) => Math.max(d.presence_at_ms || 0, d.state_at_ms || 0, d.health_at_ms || 0) || null;
  const modelStates = (d) => (d.state && Array.isArray(d.state.models) ? d.state.models : []);

  /** A model on a device against its target: on_target, updating, failed, behind (null: no target). */
  function compliance(ms) {
    const target = ms.target && ms.target.version;
    if (!target) return null;
    const active = ms.active && ms.active.version;
    const phase = ms.phase && ms.phase.phase;
    if (IN_PROGRESS.has(phase)) return 'updating';
    if (active === target) return 'on_target';
    if (phase === 'failed' || phase === 'rolled_back') return 'failed';
    return 'behind';
  }

  /**
   * How a device stands against a server-side assignment of `model` to `target`: the rule of
   * fleet-server/src/overview.rs `compliance`, so the names the console lists agree with the
   * counts GET /fleet returns (no entry for the model, or another version idle: behind).
   */
  function standing(d, model, target) {
    const ms = modelStates(d).find((m) => m.name === model);
    if (!ms) return 'behind';
    const phase = ms.phase && ms.phase.phase;
    if (phase === 'failed' || phase === 'rolled_back') return 'failed';
    if (IN_PROGRESS.has(phase)) return 'updating';
    return ms.active && ms.active.version === target ? 'on_target' : 'behind';
  }
  const standingBadge = (c) => h`<span class="badge inst-${c}">${c.replace('_', ' ')}</span>`;
  const fmtCount = (n) => (Number.isFinite(n) ? n.toLocaleString('en') : '—');

  /** An install phase in words, with download progress and failure reason. */
  function phaseCell(phase) {
    if (!phase) return h`<span class="muted">—</span>`;
    const p = phase.phase;
    if (p === 'downloading') {
      const pct = phase.total ? (100 * phase.received) / phase.total : 0;
      return h`<span class="badge inst-updating">downloading</span> ${progressBar([{ cls: 'seg-installed', value: pct }], 100)}
        <span class="muted">${fmtBytes(phase.received)} of ${fmtBytes(phase.total)} (${fmtNum(pct, 0)} %)</span>`;
    }
    if (p === 'failed' || p === 'rolled_back') {
      return h`<span class="badge inst-failed">${p.replace('_', ' ')}</span> <span class="reason">${phase.reason}</span>`;
    }
    const cls = IN_PROGRESS.has(p) ? 'inst-updating' : p === 'active' ? 'inst-on_target' : 'inst-idle';
    return h`<span class="badge ${cls}">${p.replace('_', ' ')}</span>`;
  }

  /** A horizontal bar of coloured segments (values out of `total`), as SVG (no inline style). */
  function progressBar(segments, total, title) {
    const t = total > 0 ? total : 1;
    let x = 0;
    const rects = segments.filter((s) => s.value > 0).map((s) => {
      const w = Math.min(100 - x, (100 * s.value) / t);
      const r = h`<rect class="${s.cls}" x="${x.toFixed(2)}" y="0" width="${Math.max(w, 0).toFixed(2)}" height="10"><title>${s.title || ''}</title></rect>`;
      x += w;
      return r;
    });
    return h`<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="img" aria-label="${title || ''}"><rect class="seg-empty" x="0" y="0" width="100" height="10"></rect>${rects}</svg>`;
  }

  /** The q quantile of a wire LatencyHistogram (same rule as protocol/src/histogram.rs). */
  function quantileUs(hist, q) {
    if (!hist || !hist.count) return null;
    const rank = Math.max(1, Math.ceil(q * hist.count));
    let seen = 0;
    const buckets = [...(hist.buckets || [])].sort((a, b) => a[0] - b[0]);
    for (const [bucket, count] of buckets) {
      seen += count;
      if (seen >= rank) return Math.min(2 ** (bucket / 4), Math.max(hist.max_us, 1));
    }
    return hist.max_us;
  }

  const emptyState = (text) => h`<div class="empty">${text}</div>`;
  const errorBox = (text) => h`<div class="error-box" role="alert">${text}</div>`;

  // ---- API client and session -----------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const session = { token: sessionStorage.getItem(TOKEN_KEY) || '', me: null };

  /** Whether control buttons and forms show. The API enforces roles either way. */
  function canOperate() {
    return !!session.me && (ROLE_RANK[session.me.role] ?? -1) >= ROLE_RANK.operator;
  }

  /** One API call: JSON in and out, bearer token, errors as ApiError with the server's message. */
  async function api(path, { method = 'GET', body } = {}) {
    const headers = { Authorization: `Bearer ${session.token}`, Accept: 'application/json' };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(`/api/v1${path}`, init);
    } catch (e) {
      throw new ApiError(0, 'network', `cannot reach the fleet server (${e.message})`);
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (res.ok) return data;
    // Errors are {"error": {"code", "message"}} (api.rs ApiError); tolerate other shapes.
    const err = data && data.error;
    const message = (err && typeof err === 'object' && (err.message || err.code))
      || (typeof err === 'string' && err) || text.slice(0, 300) || res.statusText;
    const e = new ApiError(res.status, (err && err.code) || `http_${res.status}`, message);
    if (res.status === 401 && session.token) {
      signOut(`The server refused your token (${message}). Sign in again.`);
    }
    throw e;
  }

  /** An error as a sentence for the page. */
  function errorText(e) {
    if (!(e instanceof ApiError)) return `Unexpected error: ${e && e.message ? e.message : e}`;
    switch (e.status) {
      case 0: return `Network error: ${e.message}. Retrying every ${POLL_MS / 1000} s.`;
      case 401: return 'Not signed in.';
      case 403: return `Your role cannot do this: ${e.message}`;
      case 404: return `Not found: ${e.message}`;
      default: return `${e.message} (HTTP ${e.status}${e.code ? `, ${e.code}` : ''})`;
    }
  }

  function signOut(message, notice = false) {
    session.token = '';
    session.me = null;
    sessionStorage.removeItem(TOKEN_KEY);
    stopPolling();
    current = null;
    gen += 1; // drops whatever is still in flight
    renderSignIn(message || '', notice);
  }

  // ---- sign-in and the header -----------------------------------------------------------

  function renderSignIn(message, notice = false) {
    $('#nav').hidden = true;
    $('#who').hidden = true;
    setStatus('');
    const app = $('#app');
    app._html = null;
    app.innerHTML = String(h`
      <section class="signin card">
        <h1>Sign in</h1>
        <p>Paste an API token of the fleet server. An admin creates one with
          <code>fleet-server token create --role viewer</code> (or <code>operator</code>, <code>admin</code>).</p>
        ${message ? (notice ? h`<p class="notice">${message}</p>` : errorBox(message)) : ''}
        <form id="signin-form" autocomplete="off">
          <label for="token">API token</label>
          <input id="token" name="token" type="password" placeholder="dgt_…" required autofocus spellcheck="false">
          <button id="signin" class="btn primary" type="submit">Sign in</button>
          <p class="muted small">The token is kept in this tab's session storage only, and sent to this server alone.</p>
        </form>
      </section>`);
    $('#signin-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const token = $('#token').value.trim();
      if (!token) return;
      $('#signin').disabled = true;
      session.token = token;
      try {
        await loadMe();
        sessionStorage.setItem(TOKEN_KEY, token);
        startApp(); // an empty hash becomes #/overview in route()
      } catch (e) {
        session.token = '';
        renderSignIn(e.status === 401 ? 'That token was refused: it is unknown, revoked or mistyped.' : errorText(e));
      }
    });
  }

  async function loadMe() {
    const me = await api('/whoami');
    session.me = { name: me.name || '(unnamed token)', role: me.role || 'viewer', token_id: me.token_id || '' };
  }

  function renderWho() {
    $('#nav').hidden = false;
    $('#who').hidden = false;
    $('#who-name').textContent = session.me.name;
    $('#who-name').title = session.me.token_id ? `token ${session.me.token_id}` : '';
    const role = $('#who-role');
    role.textContent = session.me.role;
    role.className = `badge role-${session.me.role}`;
  }

  let statusState = { text: '', error: false };
  function setStatus(text, error = false) {
    statusState = { text, error };
    const el = $('#status');
    el.textContent = text;
    el.classList.toggle('error', error);
    el.hidden = !text;
  }

  // ---- router and polling ---------------------------------------------------------------

  let current = null; // {page, params, gen}
  let gen = 0; // bumped on every route change and sign-out: stale responses are dropped
  let timer = null;
  let inFlight = false;
  let again = false;

  /** #/devices/ID, #/rollouts/ID, #/drift/MODEL/VERSION, #/devices?label=…&status=…&version=M@V&q=… */
  function parseRoute() {
    const hash = location.hash.replace(/^#\/?/, '');
    const qi = hash.indexOf('?');
    const query = new URLSearchParams(qi >= 0 ? hash.slice(qi + 1) : '');
    const parts = (qi >= 0 ? hash.slice(0, qi) : hash).split('/').filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    const [head, ...rest] = parts;
    if (head === 'devices' && rest.length) return { name: 'device', nav: 'devices', params: { id: rest.join('/') } };
    if (head === 'rollouts' && rest.length) return { name: 'rollout', nav: 'rollouts', params: { id: rest.join('/') } };
    if (head === 'drift') return { name: 'drift', nav: 'drift', params: { model: rest[0], version: rest[1] } };
    if (['overview', 'devices', 'models', 'rollouts'].includes(head)) return { name: head, nav: head, params: { query } };
    return null;
  }

  /** A link to the devices page with these filters set (label, status, version, q). */
  const devicesLink = (filters) => `#/devices?${new URLSearchParams(filters).toString()}`;

  function route() {
    if (!session.token || !session.me) return;
    const r = parseRoute();
    if (!r) { location.replace('#/overview'); return; }
    stopPolling();
    gen += 1;
    document.querySelectorAll('a[data-nav]').forEach((a) => a.classList.toggle('active', a.dataset.nav === r.nav));
    const page = PAGES[r.name];
    current = { page, params: r.params, gen };
    const app = $('#app');
    app._html = null;
    app.innerHTML = '';
    page.mount(app, r.params);
    tick();
  }

  const alive = (g) => g === gen && current && current.gen === g;

  function stopPolling() {
    clearTimeout(timer);
    timer = null;
  }

  /** Loads and renders the current page, then schedules the next poll. */
  async function tick() {
    stopPolling();
    if (!current || document.hidden) return;
    if (inFlight) { again = true; return; }
    const g = current.gen;
    inFlight = true;
    try {
      await current.page.refresh(current.params, g);
      if (alive(g)) setStatus(`Updated ${fmtClock(Date.now())} · refreshing every ${POLL_MS / 1000} s`);
    } catch (e) {
      if (alive(g) && e.status !== 401) {
        setStatus(errorText(e), true);
        // A network blip keeps the last data on screen (the status bar says it is stale);
        // a refusal or a missing object replaces it.
        if (current.page.fail && e.status !== 0) current.page.fail(e);
      }
    } finally {
      inFlight = false;
    }
    // A route change or a command while this ran: load again now, for what is shown now.
    if (again || !alive(g)) { again = false; tick(); return; }
    if (!document.hidden) timer = setTimeout(tick, POLL_MS);
  }

  document.addEventListener('visibilitychange', () => {
    if (!current || !session.me) return;
    if (document.hidden) { stopPolling(); setStatus('Paused while this tab is hidden'); } else tick();
  });

  // ---- charts (inline SVG, no library) --------------------------------------------------

  const CHART_W = 520;
  const SERIES_COLOURS = 8; // .s0 … .s7 in style.css

  /**
   * A line chart over time. series: [{name, points: [[t_ms, value], …]}]. Draws min/max labels
   * on both axes, the title with its unit, and breaks a line where reports stopped for a while.
   */
  function lineChart({ title, unit, series, fmt = fmtNum, zero = true, empty = 'not reported' }) {
    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      return h`<div class="chart-empty"><strong>${title}</strong><span>${empty}</span></div>`;
    }
    const W = CHART_W; const H = 190; const L = 60; const R = 12; const T = 28; const B = 24;
    let x0 = Infinity; let x1 = -Infinity; let y0 = zero ? 0 : Infinity; let y1 = -Infinity;
    for (const [t, v] of all) {
      x0 = Math.min(x0, t); x1 = Math.max(x1, t); y0 = Math.min(y0, v); y1 = Math.max(y1, v);
    }
    if (x1 === x0) { x0 -= 1000; x1 += 1000; }
    if (y1 === y0) y1 = y0 + (y0 === 0 ? 1 : Math.abs(y0) * 0.1);
    const sx = (t) => L + ((t - x0) / (x1 - x0)) * (W - L - R);
    const sy = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
    const lines = series.map((s, i) => {
      const pts = s.points;
      if (!pts.length) return '';
      const gaps = pts.slice(1).map((p, j) => p[0] - pts[j][0]).sort((a, b) => a - b);
      const typical = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 0;
      let d = '';
      pts.forEach(([t, v], j) => {
        const brk = j === 0 || (typical > 0 && t - pts[j - 1][0] > Math.max(5 * typical, 30000));
        d += `${brk ? 'M' : 'L'}${sx(t).toFixed(1)} ${sy(v).toFixed(1)} `;
      });
      const dot = pts.length === 1 ? h`<circle class="s${i % SERIES_COLOURS}" cx="${sx(pts[0][0]).toFixed(1)}" cy="${sy(pts[0][1]).toFixed(1)}" r="3"></circle>` : '';
      return h`<path class="line s${i % SERIES_COLOURS}" d="${d.trim()}"><title>${s.name}</title></path>${dot}`;
    });
    const legend = series.length > 1 || (series[0] && series[0].name)
      ? h`<div class="legend">${series.map((s, i) => h`<span class="key"><i class="sw s${i % SERIES_COLOURS}"></i>${s.name}</span>`)}</div>` : '';
    return h`<figure class="chart-box">
      <svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${title}">
        <text class="title" x="${L}" y="15">${title}${unit ? ` (${unit})` : ''}</text>
        <line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"></line>
        <line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"></line>
        <line class="grid" x1="${L}" y1="${T}" x2="${W - R}" y2="${T}"></line>
        <text class="tick" x="${L - 5}" y="${T + 4}" text-anchor="end">${fmt(y1)}</text>
        <text class="tick" x="${L - 5}" y="${H - B}" text-anchor="end">${fmt(y0)}</text>
        <text class="tick" x="${L}" y="${H - 6}">${fmtClock(x0)}</text>
        <text class="tick" x="${W - R}" y="${H - 6}" text-anchor="end">${fmtClock(x1)}</text>
        ${lines}
      </svg>${legend}</figure>`;
  }

  /** A bar histogram. bars: [{label, value, flag}]; min/max labels, title, unit. */
  function barChart({ title, unit, bars, fmt = fmtNum, note, cls = 'bars' }) {
    if (!bars.length) return h`<div class="chart-empty"><strong>${title}</strong><span>${note || 'no data'}</span></div>`;
    const W = CHART_W; const H = 190; const L = 52; const R = 10; const T = 28; const B = 34;
    const max = Math.max(...bars.map((b) => b.value), 0) || 1;
    const bw = (W - L - R) / bars.length;
    const rects = bars.map((b, i) => {
      const hgt = (b.value / max) * (H - T - B);
      return h`<rect class="${cls}${b.flag ? ' flag' : ''}" x="${(L + i * bw + 1).toFixed(1)}" y="${(H - B - hgt).toFixed(1)}" width="${Math.max(bw - 2, 1).toFixed(1)}" height="${hgt.toFixed(1)}"><title>${b.label}: ${fmt(b.value)}${unit ? ` ${unit}` : ''}</title></rect>`;
    });
    return h`<figure class="chart-box">
      <svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${title}">
        <text class="title" x="${L}" y="15">${title}${unit ? ` (${unit})` : ''}</text>
        <line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"></line>
        <line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"></line>
        <text class="tick" x="${L - 4}" y="${T + 4}" text-anchor="end">${fmt(max)}</text>
        <text class="tick" x="${L - 4}" y="${H - B}" text-anchor="end">0</text>
        <text class="tick" x="${L}" y="${H - 16}">${bars[0].label}</text>
        <text class="tick" x="${W - R}" y="${H - 16}" text-anchor="end">${bars[bars.length - 1].label}</text>
        ${rects}
      </svg>${note ? h`<figcaption class="muted small">${note}</figcaption>` : ''}</figure>`;
  }

  // ---- item cache: the newest outbox items per device and kind, fetched incrementally ----

  const itemCache = new Map(); // `${device}/${kind}/${n}` → {after, items, at}
  const ITEM_CACHE_KEYS = 40;

  /**
   * The newest `n` items of one kind for a device, oldest first. The first call asks for
   * ?newest=true&limit=n; later ones for the newest n after the last id seen, so a poll only
   * downloads what arrived since (and when n or more arrived, those replace the cache). With
   * `minAgeMs`, a cache younger than that is returned without asking.
   */
  async function newestItems(device, kind, n, minAgeMs = 0) {
    const key = `${device}/${kind}/${n}`;
    let c = itemCache.get(key);
    const touch = () => { itemCache.delete(key); itemCache.set(key, c); }; // least recently used first
    if (c && Date.now() - c.at < minAgeMs) { touch(); return c.items; }
    const q = `kind=${encodeURIComponent(kind)}&newest=true&limit=${n}${c ? `&after_id=${c.after}` : ''}`;
    const items = (await api(`/devices/${encodeURIComponent(device)}/items?${q}`)).items || [];
    if (!c || items.length >= n) c = { after: 0, items: [], at: 0 };
    if (items.length) {
      c.items.push(...items);
      c.after = items[items.length - 1].id;
      if (c.items.length > n) c.items.splice(0, c.items.length - n);
    }
    c.at = Date.now();
    touch();
    while (itemCache.size > ITEM_CACHE_KEYS) itemCache.delete(itemCache.keys().next().value);
    return c.items;
  }

  // ---- page: overview -------------------------------------------------------------------

  const overview = {
    mount(root) {
      root.innerHTML = String(h`
        <h1>Fleet overview</h1>
        <section id="ov-presence" class="cards"><p class="loading">Loading…</p></section>
        <h2>Active rollouts</h2>
        <section id="ov-rollouts" class="card"><p class="loading">Loading…</p></section>
        <h2>Models on the fleet</h2>
        <section id="ov-models"><p class="loading">Loading…</p></section>`);
    },
    async refresh(_p, g) {
      const [fleet, rolls, models] = await Promise.all([api('/fleet'), api('/rollouts'), api('/models')]);
      if (!alive(g)) return;
      const c = fleet.devices || {};
      const total = c.total || 0;
      const stat = (cls, n, text, filters) => h`<a class="card stat${cls ? ` ${cls}` : ''}" href="${devicesLink(filters)}"><span class="num">${fmtCount(n || 0)}</span><span>${text}</span></a>`;
      setHTML($('#ov-presence'), total ? h`
        ${stat('', total, 'devices enrolled', { status: '' })}
        ${stat('ok', c.online, 'online', { status: 'online' })}
        ${stat('warn', c.offline, 'offline', { status: 'offline' })}
        ${stat('', c.never_seen, 'never seen', { status: 'never_seen' })}
        ${c.revoked ? stat('bad', c.revoked, 'revoked', { status: 'revoked' }) : ''}
        <a class="card stat" href="#/rollouts"><span class="num">${fmtCount(fleet.active_rollouts || 0)}</span><span>active ${fleet.active_rollouts === 1 ? 'rollout' : 'rollouts'}</span></a>`
        : emptyState('No devices enrolled yet — enroll one with fleetctl device enroll'));

      const active = (rolls.rollouts || []).filter((r) => ACTIVE_PHASES.has(r.phase));
      const finished = (rolls.rollouts || []).filter((r) => !ACTIVE_PHASES.has(r.phase)).slice(0, 3); // newest first
      setHTML($('#ov-rollouts'), h`${active.length ? rolloutTable(active) : h`<p class="muted">No active rollout.</p>`}
        ${finished.length ? h`<h3 class="sub-h">Recently finished</h3>${rolloutTable(finished)}` : ''}
        <p class="small"><a href="#/rollouts">All rollouts</a></p>`);

      // Per model: the server's counts. Names of the devices off target only in a small fleet,
      // where one page of the device list is the whole fleet (see FLEET_NAMES_MAX).
      const byModel = new Map((fleet.models || []).map((m) => [m.model, m]));
      (models.models || []).forEach((m) => { if (!byModel.has(m.name)) byModel.set(m.name, { model: m.name, running: {}, assigned: {}, compliance: {} }); });
      const offTarget = [...byModel.values()].some((m) => COMPLIANCE.some((k) => k !== 'on_target' && (m.compliance || {})[k]));
      const names = new Map(); // `${model}/${standing}` → device ids
      let named = false;
      if (offTarget && total > 0 && total <= FLEET_NAMES_MAX) {
        const res = await api(`/devices?limit=${FLEET_NAMES_MAX}`);
        if (!alive(g)) return;
        named = (res.total || 0) <= FLEET_NAMES_MAX;
        (res.devices || []).filter((d) => !d.revoked_at_ms).forEach((d) => (d.assignments || []).forEach((a) => {
          const k = `${a.model}/${standing(d, a.model, a.version)}`;
          names.set(k, (names.get(k) || []).concat(d.id));
        }));
      }
      const registry = new Map();
      (models.models || []).forEach((m) => { registry.set(m.name, (registry.get(m.name) || []).concat(m)); });
      const versionList = (counts, model, verb) => {
        const e = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]);
        return e.map(([v, n], i) => h`${i ? ' · ' : ''}<a class="chip" href="${devicesLink({ version: `${model}@${v}` })}" title="list the devices with ${model}@${v} active">${v}</a> ${verb} ${plural(n, 'device')}`);
      };
      const cards = [...byModel.values()].sort((a, b) => a.model.localeCompare(b.model)).map((m) => {
        const comp = Object.fromEntries(COMPLIANCE.map((k) => [k, (m.compliance || {})[k] || 0]));
        const assigned = COMPLIANCE.reduce((a, k) => a + comp[k], 0);
        const regVersions = (registry.get(m.model) || []).length;
        const who = (k) => {
          const list = names.get(`${m.model}/${k}`) || [];
          return list.length ? h` <span class="muted small">(${list.slice(0, 8).map((id, i) => h`${i ? ', ' : ''}<a href="${link(['devices', id])}">${id}</a>`)}${list.length > 8 ? ` +${list.length - 8}` : ''})</span>` : '';
        };
        return h`<div class="card model-card">
          <h3>${m.model} <span class="muted small">${plural(regVersions, 'version')} in the registry</span></h3>
          <p><strong>Running:</strong> ${Object.keys(m.running || {}).length ? versionList(m.running, m.model, 'on') : h`<span class="muted">no device runs it</span>`}</p>
          <p><strong>Assigned:</strong> ${Object.keys(m.assigned || {}).length ? Object.entries(m.assigned).sort((a, b) => b[1] - a[1]).map(([v, n], i) => h`${i ? ' · ' : ''}<span class="chip">${v}</span> to ${plural(n, 'device')}`) : h`<span class="muted">no device is assigned it</span>`}</p>
          ${assigned ? h`
            ${progressBar([
              { cls: 'seg-installed', value: comp.on_target, title: 'on target' },
              { cls: 'seg-pending', value: comp.updating, title: 'updating' },
              { cls: 'seg-failed', value: comp.failed, title: 'failed' },
              { cls: 'seg-behind', value: comp.behind, title: 'behind' }], assigned, `${m.model} compliance`)}
            <ul class="legend-list">
              <li><i class="sw seg-installed"></i>on target: ${fmtCount(comp.on_target)}</li>
              <li><i class="sw seg-pending"></i>updating: ${fmtCount(comp.updating)}${who('updating')}</li>
              <li><i class="sw seg-failed"></i>failed: ${fmtCount(comp.failed)}${who('failed')}</li>
              <li><i class="sw seg-behind"></i>behind: ${fmtCount(comp.behind)}${who('behind')}</li>
            </ul>
            <p class="muted small">Of ${plural(assigned, 'device')} assigned a version on the server (revoked devices not counted). Behind: another version or none active and no install under way — offline, never connected, or the directive not applied yet.${offTarget && !named && assigned > comp.on_target ? ` Names are listed for fleets of up to ${FLEET_NAMES_MAX} devices.` : ''}</p>`
            : h`<p class="muted">No device is assigned this model.</p>`}
        </div>`;
      });
      setHTML($('#ov-models'), cards.length ? h`<div class="cards wide">${cards}</div>`
        : emptyState('No model in the registry yet — push one with fleetctl model push'));
    },
    fail(e) { setHTML($('#ov-presence'), errorBox(errorText(e))); },
  };

  function rolloutTable(list) {
    return h`<div class="table-wrap"><table class="list">
      <thead><tr><th>Rollout</th><th>Model</th><th>Phase</th><th>Stage</th><th>Devices</th><th>Started</th><th>By</th></tr></thead>
      <tbody>${list.map((r) => h`<tr data-rollout="${r.id}">
        <td><a href="${link(['rollouts', r.id])}">${r.id}</a></td>
        <td class="nw">${r.model}@${r.version}</td>
        <td>${phaseBadge(r.phase)}${r.reason ? h`<div class="muted small">${r.reason}</div>` : ''}</td>
        <td class="nw">${r.stage} of ${r.stages}</td>
        <td>${r.devices} ${outcomeText(r.outcomes)}</td>
        <td class="nw" title="${fmtTime(r.created_at_ms)}">${ago(r.created_at_ms)}</td>
        <td>${r.created_by}</td></tr>`)}</tbody></table></div>`;
  }
  const outcomeText = (o) => {
    const e = Object.entries(o || {});
    return e.length ? h`<span class="muted small">(${e.map(([k, n]) => `${n} ${k.replace('_', ' ')}`).join(', ')})</span>` : '';
  };

  // ---- page: devices (filtered and paged on the server) ---------------------------------

  const STATUSES = [['', 'any'], ['online', 'online'], ['offline', 'offline'], ['never_seen', 'never seen'], ['revoked', 'revoked']];
  // version: '' (any), 'M@' (model M, any version) or 'M@V'.
  const deviceUi = { label: '', status: '', version: '', q: '', page: 0 };
  let deviceTimer = null;

  /** The label field as the server takes it: comma-separated key=value pairs, trimmed. */
  function labelQuery(text) {
    return text.split(',').map((t) => t.trim()).filter(Boolean).join(',');
  }

  /** The devices query for the current filters and page. */
  function deviceQuery() {
    const q = new URLSearchParams();
    const label = labelQuery(deviceUi.label);
    if (label) q.set('label', label);
    if (deviceUi.status) q.set('presence', deviceUi.status);
    if (deviceUi.version) {
      const at = deviceUi.version.indexOf('@');
      q.set('model', at < 0 ? deviceUi.version : deviceUi.version.slice(0, at));
      if (at >= 0 && at < deviceUi.version.length - 1) q.set('version', deviceUi.version.slice(at + 1));
    }
    if (deviceUi.q.trim()) q.set('q', deviceUi.q.trim());
    q.set('offset', String(deviceUi.page * PAGE_SIZE));
    q.set('limit', String(PAGE_SIZE));
    return q.toString();
  }

  const devicesPage = {
    mount(root, { query }) {
      if (query && [...query.keys()].length) {
        // A link with filters (from the overview or the models page) replaces the current ones.
        Object.assign(deviceUi, { label: query.get('label') || '', status: query.get('status') || '', version: query.get('version') || '', q: query.get('q') || '', page: 0 });
      }
      root.innerHTML = String(h`
        <h1>Devices</h1>
        <form class="filters card" id="device-filters" autocomplete="off">
          <label for="filter-label">Labels <input id="filter-label" type="search" placeholder="site=berlin, hw=rpi4" value="${deviceUi.label}" spellcheck="false"
            title="key=value pairs separated by commas; a device must have every one"></label>
          <label for="filter-status">Status <select id="filter-status">
            ${STATUSES.map(([v, text]) => h`<option value="${v}"${deviceUi.status === v ? raw(' selected') : ''}>${text}</option>`)}
          </select></label>
          <label for="filter-version">Active model <select id="filter-version"><option value="">any</option></select></label>
          <label for="filter-q">Device id <input id="filter-q" type="search" placeholder="part of the id" value="${deviceUi.q}" spellcheck="false"></label>
          <div id="filter-error" class="form-error filter-error" role="alert" hidden></div>
        </form>
        <section id="device-table" aria-live="polite"><p class="loading">Loading…</p></section>`);
      // Typing: the list follows after a short pause, not on every key (polls in between keep
      // the filter that was last applied).
      const typed = (key) => (e) => {
        const input = e.target;
        clearTimeout(deviceTimer);
        deviceTimer = setTimeout(() => {
          if (deviceUi[key] === input.value) return;
          deviceUi[key] = input.value;
          deviceUi.page = 0;
          tick();
        }, FILTER_DEBOUNCE_MS);
      };
      // A choice (or Enter) applies every control at once, a filter still being typed included.
      const applyAll = () => {
        clearTimeout(deviceTimer);
        Object.assign(deviceUi, { label: $('#filter-label').value, status: $('#filter-status').value, version: $('#filter-version')._opts ? $('#filter-version').value : deviceUi.version, q: $('#filter-q').value, page: 0 });
        tick();
      };
      $('#filter-label').addEventListener('input', typed('label'));
      $('#filter-q').addEventListener('input', typed('q'));
      $('#filter-status').addEventListener('change', applyAll);
      $('#filter-version').addEventListener('change', applyAll);
      $('#device-filters').addEventListener('submit', (e) => { e.preventDefault(); applyAll(); });
      $('#device-table').addEventListener('click', (e) => {
        const b = e.target.closest('button[data-page]');
        if (!b) return;
        deviceUi.page = Math.max(0, deviceUi.page + (b.dataset.page === 'next' ? 1 : -1));
        tick();
      });
    },
    async refresh(_p, g) {
      const query = deviceQuery();
      const showFilterError = (text) => { const el = $('#filter-error'); if (el) { el.textContent = text; el.hidden = !text; } };
      let res;
      let fleet;
      try {
        [res, fleet] = await Promise.all([api(`/devices?${query}`), api('/fleet')]);
      } catch (e) {
        if (!alive(g) || e.status !== 400) throw e;
        if (query !== deviceQuery()) { again = true; return; }
        // A filter the server refuses: its message beside the filters, the last list dimmed.
        showFilterError(`${e.message}${/label/i.test(e.message) ? ' — labels are key=value pairs separated by commas, for example site=berlin, hw=rpi4' : ''}`);
        const t = $('#device-table');
        if (t) t.classList.add('stale');
        return;
      }
      if (!alive(g)) return;
      if (query !== deviceQuery()) { again = true; return; } // the filters changed meanwhile
      showFilterError('');
      $('#device-table').classList.remove('stale');
      const total = res.total || 0;
      if (total > 0 && !(res.devices || []).length && deviceUi.page > 0) {
        // Past the end (the list shrank): go to its last page.
        deviceUi.page = Math.floor((total - 1) / PAGE_SIZE);
        again = true;
        return;
      }
      // Active model options: every model and model@version running somewhere (from /fleet).
      const opts = [['', 'any']];
      (fleet.models || []).slice().sort((a, b) => a.model.localeCompare(b.model)).forEach((m) => {
        const versions = Object.keys(m.running || {}).sort();
        if (!versions.length) return;
        opts.push([`${m.model}@`, `${m.model} (any version)`]);
        versions.forEach((v) => opts.push([`${m.model}@${v}`, `${m.model}@${v}`]));
      });
      if (deviceUi.version && !opts.some(([v]) => v === deviceUi.version)) opts.push([deviceUi.version, `${deviceUi.version.replace(/@$/, '')} (none running)`]);
      fillSelect($('#filter-version'), opts, deviceUi.version);
      renderDeviceTable(res.devices || [], total, (fleet.devices || {}).total || 0);
    },
    fail(e) { setHTML($('#device-table'), errorBox(errorText(e))); },
  };

  /** Replaces a select's options only when they changed, keeping the chosen value. */
  function fillSelect(sel, options, value) {
    if (!sel) return;
    const key = JSON.stringify(options);
    if (sel._opts !== key) {
      sel.innerHTML = options.map(([v, text]) => String(h`<option value="${v}">${text}</option>`)).join('');
      sel._opts = key;
    }
    if (value !== undefined && options.some(([v]) => v === value)) sel.value = value;
  }

  const filtered = () => !!(labelQuery(deviceUi.label) || deviceUi.status || deviceUi.version || deviceUi.q.trim());

  function renderDeviceTable(shown, total, enrolled) {
    const el = $('#device-table');
    if (!el) return;
    if (!total && !filtered()) { setHTML(el, emptyState('No devices enrolled yet — enroll one with fleetctl device enroll')); return; }
    const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
    const start = deviceUi.page * PAGE_SIZE;
    const pager = h`<div class="pager">
      <button type="button" class="btn small" data-page="prev"${deviceUi.page === 0 ? raw(' disabled') : ''}>‹ Previous</button>
      <span>${shown.length ? `${fmtCount(start + 1)}–${fmtCount(start + shown.length)} of ${fmtCount(total)}` : `0 of ${fmtCount(total)}`}${filtered() && enrolled ? ` matching (${fmtCount(enrolled)} enrolled)` : ''} · page ${fmtCount(deviceUi.page + 1)} of ${fmtCount(pages)}</span>
      <button type="button" class="btn small" data-page="next"${deviceUi.page >= pages - 1 ? raw(' disabled') : ''}>Next ›</button></div>`;
    setHTML(el, shown.length ? h`${pager}<div class="table-wrap"><table class="list devices">
      <thead><tr><th>Device</th><th>Status</th><th>Labels</th><th>Active</th><th>Target (assigned)</th><th>Last seen</th><th>CPU</th><th>Memory</th><th>Agent</th></tr></thead>
      <tbody>${shown.map((d) => {
        const p = presenceOf(d);
        const hl = d.health || {};
        const assignments = d.assignments || [];
        return h`<tr data-device="${d.id}">
          <td><a href="${link(['devices', d.id])}">${d.id}</a></td>
          <td>${presenceBadge(p)}</td>
          <td>${labelChips(d.labels)}</td>
          <td>${modelStates(d).length ? modelStates(d).map((ms) => h`<div>${ms.name}: <strong>${ms.active ? ms.active.version : '—'}</strong>${ms.phase && ms.phase.phase !== 'idle' && ms.phase.phase !== 'active' ? h` ${phaseCell(ms.phase)}` : ''}</div>`) : h`<span class="muted">${d.state ? 'none' : '—'}</span>`}</td>
          <td>${assignments.length ? assignments.map((a) => h`<div class="nw">${a.model}@<strong>${a.version}</strong> ${d.revoked_at_ms ? '' : standingBadge(standing(d, a.model, a.version))}</div>`) : h`<span class="muted">none</span>`}</td>
          <td title="${fmtTime(lastSeen(d))}">${ago(lastSeen(d))}</td>
          <td>${hl.cpu_percent !== undefined ? `${fmtNum(hl.cpu_percent, 0)} %` : '—'}</td>
          <td>${hl.mem_total_bytes ? `${fmtNum((100 * hl.mem_used_bytes) / hl.mem_total_bytes, 0)} %` : '—'}</td>
          <td>${d.agent_version || '—'}</td></tr>`;
      })}</tbody></table></div>${pager}` : h`${emptyState('No device matches these filters.')}${pager}`);
  }

  // ---- page: one device -----------------------------------------------------------------

  const devicePage = {
    mount(root, { id }) {
      root.innerHTML = String(h`
        <p class="crumbs"><a href="#/devices">Devices</a> › ${id}</p>
        <h1>Device ${id}</h1>
        <section id="dv-head"><p class="loading">Loading…</p></section>
        <h2>Reported state</h2><section id="dv-state" class="card"><p class="loading">Loading…</p></section>
        <h2>Over time</h2><section id="dv-charts" class="charts"><p class="loading">Loading…</p></section>
        <h2>Events</h2><section id="dv-events" class="card"><p class="loading">Loading…</p></section>`);
    },
    async refresh({ id }, g) {
      const res = await api(`/devices/${encodeURIComponent(id)}`);
      if (!alive(g)) return;
      const d = res.device;
      const acked = d.acked_up_to || 0;
      const [telemetry, health, events, evictions] = await Promise.all([
        newestItems(id, 'telemetry', MAX_POINTS),
        newestItems(id, 'health', MAX_POINTS),
        newestItems(id, 'event', RECENT_EVENTS),
        newestItems(id, 'evictions', RECENT_EVICTIONS),
      ]);
      if (!alive(g)) return;
      const hl = d.health;
      setHTML($('#dv-head'), h`<div class="cards">
        <div class="card"><h3>Presence</h3><p>${presenceBadge(presenceOf(d))}${d.presence_at_ms ? h` <span class="muted">since ${fmtTime(d.presence_at_ms)}</span>` : ''}</p>
          <p>Last seen ${ago(lastSeen(d))}${lastSeen(d) ? h` <span class="muted">(${fmtTime(lastSeen(d))})</span>` : ''}</p>
          ${d.revoked_at_ms ? h`<p class="bad">Revoked ${fmtTime(d.revoked_at_ms)}</p>` : ''}</div>
        <div class="card"><h3>Labels</h3><p>${labelChips(d.labels)}</p><p class="muted small">Agent ${d.agent_version || '—'} · enrolled ${fmtTime(d.enrolled_at_ms)} · certificate until ${fmtTime(d.cert_not_after_ms)}</p></div>
        <div class="card"><h3>Health</h3>${hl ? h`<p>CPU ${fmtNum(hl.cpu_percent, 0)} % · memory ${fmtBytes(hl.mem_used_bytes)} of ${fmtBytes(hl.mem_total_bytes)}</p>
          <p>Disk free ${fmtBytes(hl.disk_free_bytes)} of ${fmtBytes(hl.disk_total_bytes)} · uptime ${fmtDuration(hl.uptime_s)} · agent RSS ${fmtBytes(hl.agent_rss_bytes)}</p>
          <p class="muted small">Link: ${hl.link ? `${hl.link.connects} connects, ${hl.link.disconnects} disconnects, ${fmtBytes(hl.link.bytes_in)} in, ${fmtBytes(hl.link.bytes_out)} out` : '—'} · reported ${ago(d.health_at_ms)}</p>`
          : h`<p class="muted">No health report yet.</p>`}</div>
        <div class="card"><h3>Stored items</h3><p>${Object.entries(res.items || {}).map(([k, n]) => h`<span class="chip">${k}: ${n.toLocaleString('en')}</span> `)}${Object.keys(res.items || {}).length ? '' : h`<span class="muted">none yet</span>`}</p>
          <p class="muted small">Acked up to item ${acked}.</p></div></div>`);

      const st = d.state;
      const assignments = res.assignments || [];
      setHTML($('#dv-state'), h`
        ${st && st.refused ? errorBox(`Refused directive${st.refused.seq !== undefined && st.refused.seq !== null ? ` #${st.refused.seq}` : ''} (${st.refused.code}): ${st.refused.reason} — ${fmtTime(st.refused.at_ms)}`) : ''}
        ${st ? h`<p class="muted small">Reported ${fmtTime(d.state_at_ms)} (${ago(d.state_at_ms)}), directive #${st.directive_seq ?? '—'} accepted (server has sent #${d.directive_seq}).</p>` : ''}
        ${modelStates(d).length ? h`<div class="table-wrap"><table class="list">
          <thead><tr><th>Model</th><th>Active</th><th>Target (device)</th><th>Assigned (server)</th><th>Previous</th><th>Install phase</th><th>Compliance</th><th>On disk</th></tr></thead>
          <tbody>${modelStates(d).map((ms) => {
            const a = assignments.find((x) => x.model === ms.name);
            const c = a ? standing(d, a.model, a.version) : compliance(ms);
            const ref = (r) => (r ? h`${r.version} <span class="muted small">r${r.release}</span>` : h`<span class="muted">—</span>`);
            return h`<tr><td>${ms.name}</td><td><strong>${ref(ms.active)}</strong></td><td>${ref(ms.target)}</td><td>${a ? a.version : h`<span class="muted">—</span>`}</td><td>${ref(ms.previous)}</td>
              <td>${phaseCell(ms.phase)}</td><td>${c ? standingBadge(c) : '—'}${c && !a ? h` <span class="muted small" title="no server-side assignment: against the target the device reports">(reported target)</span>` : ''}</td>
              <td>${(ms.installed || []).map((r) => r.version).join(', ') || '—'}</td></tr>`;
          })}</tbody></table></div>` : h`<p class="muted">${st ? 'The device reports no model.' : 'The device has not reported its state yet.'}</p>`}
        <h3>Assignments (server side)</h3>
        ${assignments.length ? h`<ul>${assignments.map((a) => h`<li>${a.model}@${a.version} ${d.revoked_at_ms ? '' : standingBadge(standing(d, a.model, a.version))} <span class="muted">since ${fmtTime(a.assigned_at_ms)}</span></li>`)}</ul>` : h`<p class="muted">No model assigned.</p>`}`);

      // Charts: CPU and memory come from health items, inference rate and p95 from telemetry.
      const cpu = health.map((i) => [i.at_ms, i.body.cpu_percent]).filter((p) => typeof p[1] === 'number');
      const mem = health.map((i) => [i.at_ms, i.body.mem_used_bytes / 1048576]).filter((p) => Number.isFinite(p[1]));
      const rss = health.map((i) => [i.at_ms, i.body.agent_rss_bytes / 1048576]).filter((p) => Number.isFinite(p[1]));
      const temps = new Map();
      health.forEach((i) => Object.entries(i.body.temperatures_c || {}).forEach(([sensor, c]) => {
        if (!temps.has(sensor)) temps.set(sensor, []);
        temps.get(sensor).push([i.at_ms, c]);
      }));
      const rate = new Map();
      const p95 = new Map();
      const errs = new Map();
      telemetry.forEach((i) => {
        const b = i.body;
        const key = `${b.model}@${b.version}`;
        if (!rate.has(key)) { rate.set(key, []); p95.set(key, []); errs.set(key, []); }
        const secs = (b.interval_ms || 1000) / 1000;
        rate.get(key).push([i.at_ms, b.inferences / secs]);
        const errors = Object.values(b.errors || {}).reduce((a, n) => a + n, 0);
        errs.get(key).push([i.at_ms, errors / secs]);
        const q = quantileUs(b.latency, 0.95);
        if (q !== null) p95.get(key).push([i.at_ms, q / 1000]);
      });
      const seriesOf = (m) => [...m.entries()].map(([name, points]) => ({ name, points }));
      const anyErrors = [...errs.values()].some((pts) => pts.some((p) => p[1] > 0));
      const memTotal = hl && hl.mem_total_bytes ? ` of ${fmtBytes(hl.mem_total_bytes)}` : '';
      setHTML($('#dv-charts'), h`
        ${lineChart({ title: 'CPU', unit: '%', series: [{ name: '', points: cpu }], empty: 'CPU not reported (no health items)' })}
        ${lineChart({ title: `Memory used${memTotal}`, unit: 'MiB', series: [{ name: 'device', points: mem }, { name: 'agent RSS', points: rss }], empty: 'memory not reported (no health items)' })}
        ${lineChart({ title: 'Inference rate', unit: 'inferences/s', series: seriesOf(rate), empty: 'no telemetry reported: the device serves no model, or nothing calls it' })}
        ${lineChart({ title: 'p95 latency', unit: 'ms', series: seriesOf(p95), empty: 'latency not reported (no telemetry with inferences)' })}
        ${anyErrors ? lineChart({ title: 'Failed inferences', unit: 'errors/s', series: seriesOf(errs) }) : h`<div class="chart-empty"><strong>Failed inferences</strong><span>${telemetry.length ? 'none in these reports' : 'not reported (no telemetry)'}</span></div>`}
        ${lineChart({ title: 'Temperature', unit: '°C', series: seriesOf(temps), zero: false, empty: health.length ? 'not reported: this device has no temperature sensors' : 'not reported (no health items)' })}
        <p class="muted small full">The newest ${plural(telemetry.length, 'telemetry report')} and ${plural(health.length, 'health report')} (at most ${MAX_POINTS} of each)${telemetry.length ? `, since ${fmtTime(Math.min(telemetry[0].at_ms, health.length ? health[0].at_ms : Infinity))}` : ''}. GPU and network-rate series are not part of the agent's reports.</p>`);

      const recent = events.slice().reverse().slice(0, 50);
      setHTML($('#dv-events'), h`${recent.length ? h`<div class="table-wrap"><table class="list">
        <thead><tr><th>When</th><th>Event</th><th>Model</th><th>Detail</th></tr></thead>
        <tbody>${recent.map((i) => h`<tr><td title="${fmtTime(i.at_ms)}">${fmtTime(i.at_ms)}</td>
          <td><span class="badge ev-${i.body.event}">${String(i.body.event || '').replace(/_/g, ' ')}</span></td>
          <td>${i.body.model || '—'}${i.body.release !== undefined && i.body.release !== null ? ` r${i.body.release}` : ''}</td><td>${i.body.detail || ''}</td></tr>`)}</tbody></table></div>`
        : h`<p class="muted">No event reported yet.</p>`}
        ${evictions.length ? h`<p class="warn small">The device's outbox gave up items under its disk quota: ${evictions.slice(-5).map((i) => `${fmtTime(i.at_ms)} ${Object.entries(i.body.evicted || {}).map(([k, n]) => `${n} ${k}`).join(', ')}`).join(' · ')}</p>` : ''}`);
    },
    fail(e) {
      if (e.status === 404) setHTML($('#dv-head'), errorBox(`${errorText(e)}. It may have been deleted.`));
      else setHTML($('#dv-head'), errorBox(errorText(e)));
    },
  };

  // ---- page: models ---------------------------------------------------------------------

  const modelDetail = new Map(); // `${name}@${version}` → show_model reply (immutable)

  const modelsPage = {
    mount(root) {
      root.innerHTML = String(h`<h1>Models</h1><section id="md-list"><p class="loading">Loading…</p></section>`);
    },
    async refresh(_p, g) {
      const [res, fleet] = await Promise.all([api('/models'), api('/fleet')]);
      const models = res.models || [];
      // Where each version runs: counts from /fleet, a few names per version from a filtered,
      // limited device list (one small request per running version).
      const running = new Map(); // name@version → {n, ids}
      (fleet.models || []).forEach((m) => Object.entries(m.running || {}).forEach(([v, n]) => running.set(`${m.model}@${v}`, { n, ids: [] })));
      await Promise.all([...running.entries()].map(async ([k, r]) => {
        const [model, version] = k.split('@');
        const list = await api(`/devices?model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}&limit=${MODEL_NAMES}`);
        r.ids = (list.devices || []).map((d) => d.id);
      }));
      const assigned = new Map();
      (fleet.models || []).forEach((m) => Object.entries(m.assigned || {}).forEach(([v, n]) => assigned.set(`${m.model}@${v}`, n)));
      // Manifests never change for a name@version: fetch each once.
      const missing = models.filter((m) => !modelDetail.has(`${m.name}@${m.version}`));
      for (let i = 0; i < missing.length; i += 6) {
        await Promise.all(missing.slice(i, i + 6).map(async (m) => {
          try { modelDetail.set(`${m.name}@${m.version}`, await api(`/models/${encodeURIComponent(m.name)}/${encodeURIComponent(m.version)}`)); } catch (e) { if (e.status === 401) throw e; }
        }));
      }
      if (!alive(g)) return;
      if (!models.length) { setHTML($('#md-list'), emptyState('No model in the registry yet — push one with fleetctl model push')); return; }
      const names = [...new Set(models.map((m) => m.name))].sort();
      setHTML($('#md-list'), names.map((name) => {
        const versions = models.filter((m) => m.name === name).sort((a, b) => b.release - a.release);
        return h`<div class="card"><h2>${name}</h2><div class="table-wrap"><table class="list">
          <thead><tr><th>Version</th><th>Release</th><th>Size</th><th>SHA-256</th><th>Profile</th><th>Signed by</th><th>Created</th><th>Pushed</th><th>Runs on</th><th>Assigned to</th></tr></thead>
          <tbody>${versions.map((m) => {
            const det = modelDetail.get(`${m.name}@${m.version}`);
            const man = det && det.manifest;
            const on = running.get(`${m.name}@${m.version}`) || { n: 0, ids: [] };
            const to = assigned.get(`${m.name}@${m.version}`) || 0;
            return h`<tr data-model="${m.name}@${m.version}"><td><strong>${m.version}</strong></td><td>${m.release}</td><td class="nw">${fmtBytes(m.size)}</td>
              <td>${shortHash(m.sha256)}</td>
              <td>${m.profile_sha256 ? h`${shortHash(m.profile_sha256, 8)} <a href="${link(['drift', m.name, m.version])}">drift</a>` : h`<span class="muted">none (no drift)</span>`}</td>
              <td>${det ? h`<code>${det.signed_by}</code>` : '—'}</td>
              <td class="nw">${man ? fmtTime(man.created_at_ms) : '—'}</td><td class="nw">${fmtTime(m.pushed_at_ms)}</td>
              <td>${on.n ? h`<a href="${devicesLink({ version: `${m.name}@${m.version}` })}">${plural(on.n, 'device')}</a>: ${on.ids.map((id, i) => h`${i ? ', ' : ''}<a href="${link(['devices', id])}">${id}</a>`)}${on.n > on.ids.length ? h` <a href="${devicesLink({ version: `${m.name}@${m.version}` })}">+${fmtCount(on.n - on.ids.length)} more</a>` : ''}` : h`<span class="muted">nowhere</span>`}</td>
              <td>${to ? plural(to, 'device') : h`<span class="muted">none</span>`}</td></tr>
              ${man ? h`<tr class="sub"><td></td><td colspan="9" class="muted small">inputs ${man.inputs.map((t) => `${t.name} ${t.datatype}[${t.shape.join('×')}]`).join(', ')} → outputs ${man.outputs.map((t) => `${t.name} ${t.datatype}[${t.shape.join('×')}]`).join(', ')}${man.min_agent_version ? ` · needs agent ≥ ${man.min_agent_version}` : ''}</td></tr>` : ''}`;
          })}</tbody></table></div></div>`;
      }));
    },
    fail(e) { setHTML($('#md-list'), errorBox(errorText(e))); },
  };

  // ---- page: rollouts (list and the start form) -----------------------------------------

  let registryModels = [];

  const rolloutsPage = {
    mount(root) {
      root.innerHTML = String(h`<h1>Rollouts</h1>
        <section id="ro-list" class="card"><p class="loading">Loading…</p></section>
        ${canOperate() ? rolloutForm() : ''}`);
      if (canOperate()) wireRolloutForm();
    },
    async refresh(_p, g) {
      const [res, models] = await Promise.all([api('/rollouts'), canOperate() ? api('/models') : null]);
      if (!alive(g)) return;
      const list = res.rollouts || [];
      setHTML($('#ro-list'), list.length ? rolloutTable(list)
        : emptyState(canOperate() ? 'No rollout yet — start one with the form below.' : 'No rollout yet.'));
      if (models) { registryModels = models.models || []; fillModelSelects(); }
    },
    fail(e) { setHTML($('#ro-list'), errorBox(errorText(e))); },
  };

  function rolloutForm() {
    const num = (id, label, value, attrs, help) => h`<label for="${id}">${label}<input id="${id}" type="number" value="${value}" ${raw(attrs)}>${help ? h`<small>${help}</small>` : ''}</label>`;
    return h`<section class="card"><h2>Start a rollout</h2>
      <form id="rollout-form" class="form-grid" autocomplete="off" novalidate>
        <label for="rf-model">Model<select id="rf-model" required></select></label>
        <label for="rf-version">Version<select id="rf-version" required></select></label>
        <label for="rf-selector">Selector<input id="rf-selector" type="text" placeholder="site=berlin, hw=rpi4"><small>Labels all devices must have; empty: every device.</small></label>
        <label for="rf-stages">Stages<input id="rf-stages" type="text" value="10%,50%,100%" required><small>Shares (10%) or device counts (3), the last 100%; or a ramp like 1x3.</small></label>
        ${num('rf-soak', 'Soak per stage (s)', 300, 'min="0" step="1"', 'Counted once all of a stage\'s devices settled.')}
        <label for="rf-spread">Spread label<input id="rf-spread" type="text" placeholder="site"><small>Spread every stage across this label's values.</small></label>
        <label for="rf-policy">On failure<select id="rf-policy"><option value="rollback">roll back</option><option value="pause">pause</option></select></label>
        ${num('rf-timeout', 'Install timeout (s)', 600, 'min="1" step="1"')}
        ${num('rf-p95', 'Max p95 ratio', 1.5, 'min="0" step="0.1"', 'Empty: no gate.')}
        ${num('rf-error-rate', 'Max error rate (%)', 1, 'min="0" max="100" step="0.1"', 'Empty: no gate.')}
        ${num('rf-drift', 'Max drift score', '', 'min="0" step="0.1"', 'Empty: no gate; above 1 is drifted.')}
        ${num('rf-reporting', 'Min devices reporting', 1, 'min="0" step="1"')}
        ${num('rf-install', 'Min install success (%)', 100, 'min="0" max="100" step="1"')}
        ${num('rf-max-failed', 'Max failed devices', 0, 'min="0" step="1"', 'More failures end the rollout at once.')}
        <div class="form-actions"><button id="rf-submit" class="btn primary" type="submit">Start rollout</button>
          <div id="rf-error" class="form-error" role="alert" hidden></div></div>
      </form></section>`;
  }

  function fillModelSelects() {
    const mSel = $('#rf-model');
    if (!mSel) return;
    const names = [...new Set(registryModels.map((m) => m.name))].sort();
    fillSelect(mSel, names.length ? names.map((n) => [n, n]) : [['', 'no model in the registry']], mSel.value || undefined);
    const versions = registryModels.filter((m) => m.name === mSel.value).sort((a, b) => b.release - a.release);
    const vSel = $('#rf-version');
    fillSelect(vSel, versions.map((m) => [m.version, `${m.version} (release ${m.release})`]), vSel.value || undefined);
  }

  /** "10%,50%,100%" or "1,5,100%" → stages; "1x3" → a ramp (as fleetctl does). */
  function parseStages(text, soak) {
    const t = text.trim();
    const ramp = t.match(/^(\d+)\s*[xX*]\s*([0-9.]+)$/);
    if (ramp) return { ramp: { start: Number(ramp[1]), factor: Number(ramp[2]), soak_secs: soak } };
    const stages = t.split(',').map((s) => s.trim()).filter(Boolean).map((part) => {
      if (part.endsWith('%')) {
        const p = Number(part.slice(0, -1).trim());
        if (!Number.isFinite(p) || part.slice(0, -1).trim() === '') throw new Error(`stage "${part}": not a percentage`);
        return { size: { percent: p }, soak_secs: soak };
      }
      if (!/^\d+$/.test(part)) throw new Error(`stage "${part}": neither N% nor a device count`);
      return { size: { count: Number(part) }, soak_secs: soak };
    });
    if (!stages.length) throw new Error('give at least one stage, for example 10%,50%,100%');
    return { stages };
  }

  /** The RolloutRequest exactly as rollout/spec.rs accepts it (deny_unknown_fields). */
  function buildRolloutRequest() {
    const val = (id) => $(id).value.trim();
    const optNum = (id, what) => {
      const v = val(id);
      if (v === '') return null;
      const n = Number(v);
      if (!Number.isFinite(n)) throw new Error(`${what}: not a number`);
      return n;
    };
    const reqNum = (id, what) => {
      const n = optNum(id, what);
      if (n === null) throw new Error(`${what}: required`);
      return n;
    };
    const model = val('#rf-model');
    const version = val('#rf-version');
    if (!model || !version) throw new Error('choose a model and a version');
    const selector = {};
    val('#rf-selector').split(',').map((s) => s.trim()).filter(Boolean).forEach((pair) => {
      const i = pair.indexOf('=');
      if (i <= 0 || i === pair.length - 1) throw new Error(`selector "${pair}": expected KEY=VALUE`);
      selector[pair.slice(0, i).trim()] = pair.slice(i + 1).trim();
    });
    const soak = reqNum('#rf-soak', 'soak');
    const body = {
      model,
      version,
      selector,
      spread_label: val('#rf-spread') || null,
      ...parseStages(val('#rf-stages'), Math.max(0, Math.round(soak))),
      gates: {
        min_install_success_pct: reqNum('#rf-install', 'min install success'),
        max_error_rate_pct: optNum('#rf-error-rate', 'max error rate'),
        max_p95_ratio: optNum('#rf-p95', 'max p95 ratio'),
        max_drift_score: optNum('#rf-drift', 'max drift score'),
        min_devices_reporting: Math.round(reqNum('#rf-reporting', 'min devices reporting')),
      },
      on_failure: val('#rf-policy'),
      install_timeout_secs: Math.round(reqNum('#rf-timeout', 'install timeout')),
      max_failed_devices: Math.round(reqNum('#rf-max-failed', 'max failed devices')),
    };
    return body;
  }

  function wireRolloutForm() {
    $('#rf-model').addEventListener('change', () => { $('#rf-version')._opts = null; $('#rf-version').value = ''; fillModelSelects(); });
    $('#rollout-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const errEl = $('#rf-error');
      const showError = (text) => { errEl.textContent = text; errEl.hidden = !text; };
      let body;
      try { body = buildRolloutRequest(); } catch (e) { showError(e.message); return; }
      showError('');
      const btn = $('#rf-submit');
      btn.disabled = true;
      btn.textContent = 'Starting…';
      try {
        const res = await api('/rollouts', { method: 'POST', body });
        location.hash = link(['rollouts', res.rollout.id]);
      } catch (e) {
        if (e.status !== 401) showError(errorText(e));
      } finally {
        btn.disabled = false;
        btn.textContent = 'Start rollout';
      }
    });
  }

  // ---- page: one rollout ----------------------------------------------------------------

  const auditCache = new Map(); // rollout id → {after, entries}

  const rolloutPage = {
    mount(root, { id }) {
      root.innerHTML = String(h`
        <p class="crumbs"><a href="#/rollouts">Rollouts</a> › ${id}</p>
        <section id="rd-head"><p class="loading">Loading…</p></section>
        ${canOperate() ? h`<section class="card controls" id="rd-controls">
          <h2>Control</h2>
          <div class="control-row">
            <label for="command-reason" class="grow">Reason (for the audit log)<input id="command-reason" type="text" maxlength="500" placeholder="optional: why"></label>
            ${['pause', 'resume', 'abort', 'rollback'].map((c) => h`<button type="button" class="btn ${c === 'rollback' || c === 'abort' ? 'danger' : ''}" data-command="${c}" disabled>${c[0].toUpperCase() + c.slice(1)}</button>`)}
          </div>
          <p id="command-msg" class="muted small" role="status"></p></section>` : ''}
        <h2>Stages</h2><section id="rd-stages" class="card"><p class="loading">Loading…</p></section>
        <h2>Gate evaluations</h2><section id="rd-evals"><p class="loading">Loading…</p></section>
        <h2>Devices</h2><section id="rd-devices" class="card"><p class="loading">Loading…</p></section>
        <h2>Audit trail</h2><section id="rd-audit" class="card"><p class="loading">Loading…</p></section>`);
      const controls = $('#rd-controls');
      if (controls) controls.addEventListener('click', (e) => { const b = e.target.closest('button[data-command]'); if (b) runCommand(id, b.dataset.command); });
    },
    async refresh({ id }, g) {
      const res = await api(`/rollouts/${encodeURIComponent(id)}`);
      let a = auditCache.get(id);
      if (!a) { a = { after: 0, entries: [] }; auditCache.set(id, a); }
      for (let page = 0; page < 5; page += 1) {
        const more = (await api(`/audit?rollout=${encodeURIComponent(id)}&after_id=${a.after}&limit=1000`)).entries || [];
        if (more.length) { a.entries.push(...more); a.after = more[more.length - 1].id; }
        if (more.length < 1000) break;
      }
      if (!alive(g)) return;
      renderRollout(res, a.entries);
    },
    fail(e) { setHTML($('#rd-head'), errorBox(errorText(e))); },
  };

  async function runCommand(id, command) {
    const input = $('#command-reason');
    const msg = $('#command-msg');
    const reason = input.value.trim();
    document.querySelectorAll('button[data-command]').forEach((b) => { b.disabled = true; });
    msg.className = 'muted small';
    msg.textContent = `Sending ${command}…`;
    try {
      const res = await api(`/rollouts/${encodeURIComponent(id)}/${command}`, { method: 'POST', body: reason ? { reason } : {} });
      input.value = '';
      msg.textContent = `Done: the rollout is now ${String(res.rollout.phase).replace(/_/g, ' ')}.`;
    } catch (e) {
      if (e.status === 401) return;
      msg.className = 'form-error';
      msg.textContent = errorText(e);
    }
    tick();
  }

  function renderRollout(res, audit) {
    const r = res.rollout;
    const spec = res.spec || {};
    const devices = res.devices || {};
    const evals = res.evaluations || [];
    const soakLeft = r.soak_started_ms && r.soak_secs !== null && r.phase === 'running'
      ? Math.max(0, (r.soak_started_ms + r.soak_secs * 1000 - Date.now()) / 1000) : null;
    setHTML($('#rd-head'), h`<h1>Rollout ${r.id}: ${r.model}@${r.version} ${phaseBadge(r.phase, 'rollout-phase')}</h1>
      ${r.reason ? h`<p class="reason-line">${r.reason}</p>` : ''}
      <p class="muted">Stage ${r.stage} of ${r.stages} · ${plural(r.devices, 'device')} reached ${outcomeText(r.outcomes)} · started ${fmtTime(r.created_at_ms)} by ${r.created_by}${r.finished_ms ? ` · finished ${fmtTime(r.finished_ms)}` : ''}
      ${soakLeft !== null ? h` · soaking: ${soakLeft > 0 ? `${fmtDuration(soakLeft)} left` : 'gates due'}` : ''}</p>
      <p class="muted small">Selector: ${labelsText(spec.selector) || 'every device'}${spec.spread_label ? ` · spread across ${spec.spread_label}` : ''} · on failure: ${spec.on_failure || '—'} · install timeout ${fmtDuration(spec.install_timeout_secs)} · at most ${spec.max_failed_devices ?? 0} failed devices${spec.ramp ? ` · ramp ${spec.ramp.start}×${spec.ramp.factor}` : ''}</p>`);

    document.querySelectorAll('button[data-command]').forEach((b) => {
      const ok = (COMMAND_PHASES[b.dataset.command] || []).includes(r.phase);
      b.disabled = !ok;
      b.title = ok ? '' : `not possible while the rollout is ${r.phase.replace(/_/g, ' ')}`;
    });

    // Stage bars: each stage's devices by outcome against its cumulative target, with the
    // selector's match count taken from the rollout_created audit entry.
    const created = audit.find((e) => e.action === 'rollout_created');
    const selected = created && created.details && Number.isFinite(created.details.devices) ? created.details.devices : null;
    const stages = spec.stages || [];
    const target = (k) => {
      if (selected === null) return null;
      let most = 0;
      for (let i = 0; i <= k; i += 1) {
        const s = stages[i].size || {};
        const n = s.percent !== undefined ? Math.min(selected, Math.max(0, Math.ceil((selected * s.percent) / 100 - 1e-9))) : Math.min(selected, s.count || 0);
        most = Math.max(most, n);
      }
      return most;
    };
    const OUT = ['installed', 'pending', 'failed', 'timed_out', 'reverted', 'gone'];
    const perStage = stages.map(() => Object.fromEntries(OUT.map((o) => [o, 0])));
    Object.values(devices).forEach((d) => { if (perStage[d.stage]) perStage[d.stage][d.outcome] = (perStage[d.stage][d.outcome] || 0) + 1; });
    let cumulative = 0;
    setHTML($('#rd-stages'), stages.length ? h`<ol class="stages">${stages.map((s, i) => {
      const c = perStage[i];
      const reached = OUT.reduce((a, o) => a + c[o], 0);
      cumulative += reached;
      const tgt = target(i);
      const prevTgt = i > 0 ? target(i - 1) : 0;
      const want = tgt === null ? null : tgt - prevTgt;
      const state = i + 1 < r.stage || r.phase === 'completed' ? 'done' : i + 1 === r.stage ? 'current' : 'later';
      const size = s.size && s.size.percent !== undefined ? `${s.size.percent} %` : plural(s.size ? s.size.count : 0, 'device');
      return h`<li class="stage ${state}"><div class="stage-head"><strong>Stage ${i + 1}</strong> · ${size} · soak ${fmtDuration(s.soak_secs)}${s.gates ? ' · own gates' : ''}
          <span class="muted small">${reached}${want !== null ? ` of ${want}` : ''} new devices, ${cumulative}${tgt !== null ? ` of ${tgt}` : ''} in all</span></div>
        ${progressBar([
          { cls: 'seg-installed', value: c.installed, title: `${c.installed} installed` },
          { cls: 'seg-pending', value: c.pending, title: `${c.pending} pending` },
          { cls: 'seg-failed', value: c.failed + c.timed_out, title: `${c.failed} failed, ${c.timed_out} timed out` },
          { cls: 'seg-behind', value: c.reverted, title: `${c.reverted} reverted` },
          { cls: 'seg-gone', value: c.gone, title: `${c.gone} gone` }], Math.max(want || 0, reached), `stage ${i + 1}`)}
        <span class="small">${OUT.filter((o) => c[o]).map((o) => `${c[o]} ${o.replace('_', ' ')}`).join(' · ') || h`<span class="muted">not reached yet</span>`}</span></li>`;
    })}</ol>
    <p class="muted small">Gates: ${gatesText(spec.gates)}.${selected !== null ? ` ${plural(selected, 'device')} matched the selector when the rollout started.` : ''}</p>` : emptyState('This rollout has no stages.'));

    setHTML($('#rd-evals'), evals.length ? h`<ol class="timeline">${evals.slice().reverse().map((e) => h`
      <li class="evaluation ${e.passed ? 'passed' : 'failed'}" data-stage="${e.stage + 1}">
        <div class="ev-head"><span class="badge ${e.passed ? 'ok' : 'bad'}">${e.passed ? 'passed' : 'failed'}</span>
          <strong>Stage ${e.stage + 1}</strong> <span class="muted">${fmtTime(e.at_ms)}</span></div>
        <p class="small">Installs: ${e.installs.installed} of ${e.installs.reached} installed, ${e.installs.failed} failed ·
          ${fmtNum(e.figures.inferences)} inferences, ${fmtNum(e.figures.errors)} errors on ${plural(e.figures.devices_reporting, 'device')} ·
          p95 ${fmtUs(e.figures.p95_us)} (before ${fmtUs(e.figures.previous_p95_us)}) ·
          drift score ${fmtNum(e.figures.drift_score)} over ${plural(e.figures.drift_windows, 'window')}</p>
        <div class="table-wrap"><table class="list checks"><thead><tr><th>Gate</th><th>Value</th><th>Limit</th><th>Result</th><th>Note</th></tr></thead>
          <tbody>${(e.checks || []).map((c) => h`<tr class="${c.passed ? '' : 'row-bad'}"><td>${c.gate.replace(/_/g, ' ')}</td><td>${c.value === null || c.value === undefined ? 'not measured' : fmtNum(c.value, 3)}</td>
            <td>${fmtNum(c.limit, 3)}</td><td>${c.passed ? h`<span class="ok">✔ passed</span>` : h`<span class="bad">✘ failed</span>`}</td><td>${c.note}</td></tr>`)}</tbody></table></div>
      </li>`)}</ol>` : emptyState(ACTIVE_PHASES.has(r.phase) ? 'No gate evaluated yet: a stage is judged after its devices settle and soak.' : 'No gate was evaluated.'));

    // Problems first; a large rollout shows its first 100 rows (the counts above cover all).
    const rank = { failed: 0, timed_out: 1, pending: 2, reverted: 3, installed: 4, gone: 5 };
    const devRows = Object.entries(devices)
      .sort((a, b) => (rank[a[1].outcome] ?? 9) - (rank[b[1].outcome] ?? 9) || a[1].stage - b[1].stage || a[0].localeCompare(b[0]));
    const devShown = devRows.slice(0, 100);
    setHTML($('#rd-devices'), devRows.length ? h`${devRows.length > devShown.length ? h`<p class="muted small">${devShown.length} of ${devRows.length} devices, failures and pending installs first.</p>` : ''}<div class="table-wrap"><table class="list">
      <thead><tr><th>Device</th><th>Stage</th><th>Previous</th><th>Outcome</th><th>Reached</th><th>Reason</th></tr></thead>
      <tbody>${devShown.map(([id, d]) => h`<tr data-device="${id}"><td><a href="${link(['devices', id])}">${id}</a></td><td>${d.stage + 1}</td><td>${d.previous || h`<span class="muted">none</span>`}</td>
        <td><span class="badge out-${d.outcome}">${d.outcome.replace('_', ' ')}</span>${d.reverted_sent ? h` <span class="muted small">revert sent</span>` : ''}</td><td>${fmtTime(d.reached_at_ms)}</td><td>${d.reason || ''}</td></tr>`)}</tbody></table></div>`
      : h`<p class="muted">No device reached yet.</p>`);

    setHTML($('#rd-audit'), audit.length ? h`<div class="table-wrap"><table class="list audit">
      <thead><tr><th>When</th><th>Who</th><th>Action</th><th>Message</th></tr></thead>
      <tbody>${audit.slice().reverse().map((e) => h`<tr><td>${fmtTime(e.at_ms)}</td><td>${e.actor}</td><td><code>${e.action}</code></td>
        <td>${e.message}${e.details && Object.keys(e.details).length ? h`<details data-key="a${e.id}"><summary class="muted small">details</summary><pre>${JSON.stringify(e.details, null, 2)}</pre></details>` : ''}</td></tr>`)}</tbody></table></div>`
      : h`<p class="muted">No audit entry yet.</p>`);
  }

  function gatesText(g) {
    if (!g) return '—';
    return [
      `install success ≥ ${g.min_install_success_pct} %`,
      `devices reporting ≥ ${g.min_devices_reporting}`,
      g.max_error_rate_pct !== null && g.max_error_rate_pct !== undefined ? `error rate ≤ ${g.max_error_rate_pct} %` : 'no error-rate gate',
      g.max_p95_ratio !== null && g.max_p95_ratio !== undefined ? `p95 ratio ≤ ${g.max_p95_ratio}` : 'no latency gate',
      g.max_drift_score !== null && g.max_drift_score !== undefined ? `drift score ≤ ${g.max_drift_score}` : 'no drift gate',
    ].join(', ');
  }

  // ---- drift statistics (mirroring protocol/src/drift.rs and rollout_runner.rs) ---------

  const PSI_PSEUDO_COUNT = 0.5;

  /** PSI of window counts against reference proportions: Σ (a - e)·ln(a / e), a smoothed. */
  function psiOf(counts, reference) {
    const n = counts.reduce((a, c) => a + c, 0);
    if (!n) return 0;
    const den = n + PSI_PSEUDO_COUNT * counts.length;
    let sum = 0;
    for (let i = 0; i < Math.min(counts.length, reference.length); i += 1) {
      const a = (counts[i] + PSI_PSEUDO_COUNT) / den;
      sum += (a - reference[i]) * Math.log(a / reference[i]);
    }
    return sum;
  }

  /** The thresholds of the longest calibrated window length not above `samples` (thresholds_for). */
  function thresholdsFor(profile, samples) {
    let best = null;
    (profile.thresholds || []).forEach((t) => { if (t.window <= samples && (!best || t.window > best.window)) best = t; });
    return best;
  }

  const ratio = (psi, threshold) => (threshold > 0 ? psi / threshold : 0);

  /** A feature's score: PSI over its threshold for `samples`; null when too short to judge. */
  function featureScore(profile, samples, index, psi) {
    const t = profile && thresholdsFor(profile, samples);
    return t && index < t.psi.length ? ratio(psi, t.psi[index]) : null;
  }

  /**
   * A drift window's score as the rollout gate computes it (rollout_runner.rs drift_score): the
   * largest psi / threshold over the features and the prediction (class and max-probability
   * histograms, or output values), recomputed from the counts; null when it cannot be judged.
   */
  function windowScore(profile, w) {
    if (!profile || !w || (w.features || []).length !== profile.features.length) return null;
    const t = thresholdsFor(profile, w.samples);
    if (!t) return null;
    let max = 0;
    for (let f = 0; f < profile.features.length; f += 1) {
      const fw = w.features[f];
      const fp = profile.features[f];
      if (fw.index !== f || fw.counts.length !== fp.proportions.length) return null;
      max = Math.max(max, ratio(psiOf(fw.counts, fp.proportions), t.psi[f]));
    }
    const p = profile.prediction;
    const pw = w.prediction;
    if (!p !== !pw) return null;
    if (p && p.kind === 'classifier') {
      if (pw.class_counts.length !== p.class_proportions.length || pw.max_prob_counts.length !== p.max_prob_proportions.length) return null;
      max = Math.max(max, ratio(psiOf(pw.class_counts, p.class_proportions), t.prediction_psi), ratio(psiOf(pw.max_prob_counts, p.max_prob_proportions), t.max_prob_psi));
    } else if (p && p.kind === 'regressor') {
      if ((pw.value_counts || []).length !== p.proportions.length) return null;
      max = Math.max(max, ratio(psiOf(pw.value_counts, p.proportions), t.prediction_psi));
    }
    return max;
  }

  /** Effect size in reference σ (drift.rs effect): the 2-Wasserstein distance of two Gaussians. */
  function effectOf(n, sum, sumSq, refMean, refStd) {
    if (!n) return null;
    const mean = sum / n;
    const sd = Math.sqrt(Math.max(sumSq / n - mean * mean, 0));
    const scale = refStd > 0 ? refStd : 1;
    return { mean, sd, effect: Math.hypot((mean - refMean) / scale, (sd - refStd) / scale) };
  }

  function featureName(profile, i) {
    const f = profile && profile.features[i];
    if (!f) return `feature ${i}`;
    if (f.name) return f.name;
    const src = f.source || {};
    if (src.kind === 'element') return `input ${src.input} [${src.element}]`;
    if (src.kind === 'channel_mean') return `input ${src.input} channel ${src.channel} mean`;
    if (src.kind === 'channel_std') return `input ${src.input} channel ${src.channel} sd`;
    return `feature ${i}`;
  }

  const fmtEdge = (v) => String(parseFloat(Number(v).toPrecision(4)));

  /** Labels of a profile's bins (protocol/src/profile.rs): out of range below, deciles, above. */
  function binLabels(edges) {
    const m = edges.length;
    const inner = Math.max(m - 1, 1);
    const out = [{ short: `<${fmtEdge(edges[0])}`, long: `below the training minimum (< ${edges[0]})` }];
    if (m === 1) out.push({ short: fmtEdge(edges[0]), long: `= ${edges[0]}` });
    for (let i = 1; m > 1 && i <= inner; i += 1) {
      out.push({ short: `${fmtEdge(edges[i - 1])}–${fmtEdge(edges[i])}`, long: `[${edges[i - 1]}, ${edges[i]}${i === inner ? ']' : ')'}` });
    }
    out.push({ short: `>${fmtEdge(edges[m - 1])}`, long: `above the training maximum (> ${edges[m - 1]})` });
    return out;
  }

  /** Grouped bars over the same bins: series [{name, cls, values}] (values in %). */
  function histChart({ title, bins, series, note }) {
    const W = CHART_W; const H = 220; const L = 44; const R = 10; const T = 28; const B = 56;
    const max = Math.max(0, ...series.flatMap((s) => s.values)) || 1;
    const gw = (W - L - R) / bins.length;
    const bw = Math.max((gw - 4) / series.length, 1);
    const rects = bins.map((b, i) => series.map((s, j) => {
      const v = s.values[i] || 0;
      const hgt = (v / max) * (H - T - B);
      return h`<rect class="${s.cls}" x="${(L + i * gw + 2 + j * bw).toFixed(1)}" y="${(H - B - hgt).toFixed(1)}" width="${Math.max(bw - 1, 1).toFixed(1)}" height="${hgt.toFixed(1)}"><title>${s.name} · ${b.long}: ${fmtNum(v, 2)} %</title></rect>`;
    }));
    const ticks = bins.map((b, i) => {
      const x = L + (i + 0.5) * gw;
      return h`<text class="tick small-tick" x="${x.toFixed(1)}" y="${H - B + 12}" text-anchor="end" transform="rotate(-35 ${x.toFixed(1)} ${H - B + 12})">${b.short}</text>`;
    });
    return h`<figure class="chart-box">
      <svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${title}">
        <text class="title" x="${L}" y="15">${title} (%)</text>
        <line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"></line>
        <line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"></line>
        <text class="tick" x="${L - 4}" y="${T + 4}" text-anchor="end">${fmtNum(max, 1)}</text>
        <text class="tick" x="${L - 4}" y="${H - B}" text-anchor="end">0</text>
        ${rects}${ticks}
      </svg>
      <div class="legend">${series.map((s) => h`<span class="key"><i class="sw ${s.cls}"></i>${s.name}</span>`)}</div>
      ${note ? h`<figcaption class="muted small">${note}</figcaption>` : ''}</figure>`;
  }

  // ---- page: drift ----------------------------------------------------------------------

  const driftUi = { model: '', version: '', label: '', window: '', feature: '' };
  const profileCache = new Map(); // `${name}@${version}` → ReferenceProfile, or null (none shipped)
  let labelSample = { at: 0, keys: [], devices: [], total: 0 };
  const movedOn = new Set(); // `${device}/${model}/${release}/${window}`: no such window in its newest drift items

  /** A version's reference profile, fetched once (it never changes); null when it has none. */
  async function profileOf(name, version, record) {
    const key = `${name}@${version}`;
    if (profileCache.has(key)) return profileCache.get(key);
    let profile = null;
    if (record && record.profile_sha256) {
      try {
        profile = (await api(`/models/${encodeURIComponent(name)}/${encodeURIComponent(version)}/profile`)).profile || null;
      } catch (e) {
        if (e.status !== 404) throw e;
      }
    }
    profileCache.set(key, profile);
    return profile;
  }

  /** Label keys from a small sample of the fleet (for the cohort select), refreshed each minute. */
  async function labelKeys() {
    if (Date.now() - labelSample.at > 60000) {
      const res = await api(`/devices?limit=${LABEL_SAMPLE}`);
      const devices = (res.devices || []).map((d) => ({ id: d.id, labels: d.labels || {} }));
      labelSample = { at: Date.now(), keys: [...new Set(devices.flatMap((d) => Object.keys(d.labels)))].sort(), devices, total: res.total || devices.length };
    }
    return labelSample.keys;
  }

  const scoreLevel = (s) => (s < 0.25 ? 0 : s < 0.5 ? 1 : s < 0.75 ? 2 : s < 1 ? 3 : 4);
  const psiLevel = (p) => (p < 0.02 ? 0 : p < 0.05 ? 1 : p < 0.1 ? 2 : p < 0.25 ? 3 : 4);

  /**
   * Drift over time per cohort (the chosen label's values): per time bucket, the highest window
   * score among the cohort's followed devices, for the whole window (as the gate scores it) and
   * for the chosen feature. chartCohorts: [{value, members, followed: [device row]}] (at most
   * COHORT_CHART_VALUES); allCohorts: every cohort of this window length; fetched: device →
   * its drift items of this version and window length, oldest first.
   */
  function cohortCharts({ chartCohorts, allCohorts, fetched, itemWindowScore, itemFeatureScore, featureTitle, profile }) {
    const key = driftUi.label;
    if (!key) return '';
    const head = h`<h2 class="full sub-chart-h">Per cohort over time (${key})</h2>`;
    // Label values seen in the fleet sample with no drift window of this length: say so.
    const known = new Set(allCohorts.map((c) => String(c.value)));
    const silent = [...new Set(labelSample.devices.map((d) => d.labels[key]).filter((v) => v !== undefined && v !== null).map(String))]
      .filter((v) => !known.has(v)).sort();
    const silentText = silent.length
      ? h`<p class="muted small full">No ${driftUi.window}-sample drift window of ${driftUi.model}@${driftUi.version} yet from ${silent.map((v) => `${key}=${v}`).join(', ')}${labelSample.total > labelSample.devices.length ? ` (label values from a sample of ${labelSample.devices.length} of ${labelSample.total} devices)` : ''}.</p>` : '';
    if (!allCohorts.length) {
      return h`${head}<div class="chart-empty"><strong>Drift score over time by ${key}</strong><span>No device with drift data has the label ${key}.</span></div>${silentText}`;
    }
    // Bucket: the windows' typical period (their end times' median gap), at least 10 s.
    const gaps = [];
    fetched.forEach((items) => items.forEach((it, j) => {
      const gap = j ? it.body.ended_at_ms - items[j - 1].body.ended_at_ms : 0;
      if (gap > 0) gaps.push(gap);
    }));
    gaps.sort((a, b) => a - b);
    const median = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 0;
    const bucket = Math.max(COHORT_BUCKET_MS, Math.ceil(median / 1000) * 1000);
    const seriesOf = (scoreFn) => chartCohorts.map((c) => {
      const byBucket = new Map();
      c.followed.forEach((d) => (fetched.get(d.device) || []).forEach((i) => {
        const v = scoreFn(i);
        if (v === null || v === undefined || !Number.isFinite(v)) return;
        const b = Math.floor(i.body.ended_at_ms / bucket) * bucket;
        byBucket.set(b, Math.max(byBucket.has(b) ? byBucket.get(b) : -Infinity, v));
      }));
      const points = [...byBucket.entries()].sort((a, b) => a[0] - b[0]);
      return { name: `${key}=${c.value}${points.length ? '' : ' (no window yet)'}`, points };
    });
    const scoreSeries = seriesOf(itemWindowScore);
    const featureSeries = seriesOf(itemFeatureScore);
    const none = `no ${driftUi.window}-sample window of this version among the followed devices' newest ${DRIFT_ITEMS} drift items`;
    const based = chartCohorts.map((c) => {
      const has = c.followed.some((d) => (fetched.get(d.device) || []).length);
      return h`<li><strong>${key}=${c.value}</strong>: ${c.followed.length ? c.followed.map((d) => d.device).join(', ') : 'no device to follow'}${c.members > c.followed.length ? ` (the ${c.followed.length} highest-scoring of ${plural(c.members, 'device')} with drift data)` : ''}${has ? '' : h` <span class="warn-text">— no drift window of this version and length among their newest items yet</span>`}</li>`;
    });
    const hidden = allCohorts.length - chartCohorts.length;
    const shownValues = new Set(chartCohorts.map((c) => String(c.value)));
    const hiddenValues = allCohorts.filter((c) => !shownValues.has(String(c.value))).map((c) => String(c.value));
    return h`${head}
      ${lineChart({ title: `Drift score over time by ${key}`, unit: '', series: scoreSeries, empty: none })}
      ${lineChart({ title: `${featureTitle}: ${profile ? 'score' : 'PSI'} over time by ${key}`, unit: profile ? 'PSI / threshold' : '', series: featureSeries, empty: none })}
      <div class="muted small full cohort-basis">
        <p>Each point: the highest ${driftUi.window}-sample window ${profile ? 'score (PSI over its threshold, the largest over the features and the prediction for the first chart, as the gate computes it)' : 'score reported by the devices (no reference profile to re-score with)'} among the cohort's followed devices, per ${fmtNum(bucket / 1000, 0)}-second interval of the windows' end times. Based on the newest ${DRIFT_ITEMS} drift items of these devices:</p>
        <ul class="cohort-devices">${based}</ul>
        ${hidden > 0 ? h`<p>${plural(hidden, 'other cohort')} not shown (lower scores): ${hiddenValues.slice(0, 20).map((v) => `${key}=${v}`).join(', ')}${hiddenValues.length > 20 ? ', …' : ''}.</p>` : ''}
      </div>${silentText}`;
  }

  const driftPage = {
    mount(root, params) {
      if (params.model) { driftUi.model = params.model; driftUi.version = params.version || ''; driftUi.feature = ''; }
      movedOn.clear();
      root.innerHTML = String(h`<h1>Drift</h1>
        <form class="filters card" id="drift-filters" autocomplete="off">
          <label>Model <select id="dr-model"></select></label>
          <label>Version <select id="dr-version"></select></label>
          <label>Cohorts by label <select id="dr-label"><option value="">none</option></select></label>
          <label>Window length <select id="dr-window"></select></label>
          <label>Feature <select id="dr-feature"></select></label>
        </form>
        <section id="dr-summary"><p class="loading">Loading…</p></section>
        <section id="dr-cohort-time" class="charts"></section>
        <h2>Per feature</h2><section id="dr-heat" class="card"><p class="loading">Loading…</p></section>
        <h2>Chosen feature</h2><section id="dr-feature-view" class="charts"><p class="loading">Loading…</p></section>`);
      const on = (sel, key, reset) => $(sel).addEventListener('change', (e) => {
        driftUi[key] = e.target.value;
        if (reset) reset();
        tick();
      });
      on('#dr-model', 'model', () => { driftUi.version = ''; driftUi.feature = ''; });
      on('#dr-version', 'version', () => { driftUi.feature = ''; });
      on('#dr-label', 'label');
      on('#dr-window', 'window');
      on('#dr-feature', 'feature');
      $('#drift-filters').addEventListener('submit', (e) => e.preventDefault());
      const pick = (e) => {
        const el = e.target.closest('[data-feature]');
        if (el) { e.preventDefault(); driftUi.feature = el.dataset.feature; tick(); }
      };
      $('#dr-heat').addEventListener('click', pick);
      $('#dr-summary').addEventListener('click', pick);
    },
    async refresh(_p, g) {
      const [models, fleet, keys] = await Promise.all([api('/models'), api('/fleet'), labelKeys()]);
      if (!alive(g)) return;
      const list = models.models || [];
      if (!list.length) {
        setHTML($('#dr-summary'), emptyState('No model in the registry yet — push one with fleetctl model push'));
        setHTML($('#dr-heat'), ''); setHTML($('#dr-feature-view'), ''); setHTML($('#dr-cohort-time'), '');
        return;
      }
      const names = [...new Set(list.map((m) => m.name))].sort();
      if (!names.includes(driftUi.model)) driftUi.model = names[0];
      fillSelect($('#dr-model'), names.map((n) => [n, n]), driftUi.model);
      const versions = list.filter((m) => m.name === driftUi.model).sort((a, b) => b.release - a.release);
      if (!versions.some((m) => m.version === driftUi.version)) {
        // Default to the newest version some device runs, else the newest.
        const entry = (fleet.models || []).find((m) => m.model === driftUi.model);
        const running = new Set(Object.keys((entry && entry.running) || {}));
        driftUi.version = (versions.find((m) => running.has(m.version)) || versions[0]).version;
      }
      fillSelect($('#dr-version'), versions.map((m) => [m.version, `${m.version} (release ${m.release})${m.profile_sha256 ? '' : ' · no profile'}`]), driftUi.version);
      const labelOpts = [...keys];
      if (driftUi.label && !labelOpts.includes(driftUi.label)) labelOpts.push(driftUi.label);
      fillSelect($('#dr-label'), [['', 'none'], ...labelOpts.map((k) => [k, k])], driftUi.label);
      const record = versions.find((m) => m.version === driftUi.version);

      const q = driftUi.label ? `?label=${encodeURIComponent(driftUi.label)}` : '';
      const [drift, profile] = await Promise.all([
        api(`/models/${encodeURIComponent(driftUi.model)}/${encodeURIComponent(driftUi.version)}/drift${q}`),
        profileOf(driftUi.model, driftUi.version, record),
      ]);
      if (!alive(g)) return;
      const windows = [...new Set((drift.devices || []).map((d) => d.window_len))].sort((a, b) => a - b);
      if (!windows.map(String).includes(String(driftUi.window))) driftUi.window = windows.length ? String(windows[0]) : '';
      fillSelect($('#dr-window'), windows.length ? windows.map((w) => [String(w), `${w} samples`]) : [['', '—']], driftUi.window);
      const allRows = (drift.devices || []).filter((d) => String(d.window_len) === driftUi.window);
      // A large fleet: the tables and the heat map show the devices with the highest scores.
      const rows = allRows.length <= DRIFT_TABLE_ROWS ? allRows
        : allRows.slice().sort((a, b) => b.max_score - a.max_score).slice(0, DRIFT_TABLE_ROWS);
      const cohorts = (drift.cohorts || []).filter((d) => String(d.window_len) === driftUi.window).slice(0, DRIFT_TABLE_ROWS);
      if (!rows.length) {
        setHTML($('#dr-summary'), emptyState(record && !record.profile_sha256
          ? `${driftUi.model}@${driftUi.version} ships no reference profile, so devices do not compute drift for it.`
          : `No drift window reported for ${driftUi.model}@${driftUi.version} yet: devices report them once they run it.`));
        setHTML($('#dr-heat'), ''); setHTML($('#dr-feature-view'), ''); setHTML($('#dr-cohort-time'), '');
        fillSelect($('#dr-feature'), [['', '—']], '');
        return;
      }
      const nFeatures = profile ? profile.features.length : Math.max(...rows.map((d) => d.features.length));
      const name = (i) => featureName(profile, i);
      // Per-feature score of a merged row: its PSI over the threshold for its sample count,
      // as the server's re-scoring (drift.rs score) judges the merged window.
      const scoreOf = (d, f) => featureScore(profile, d.samples, f.index, f.psi);
      if (driftUi.feature === '' || Number(driftUi.feature) >= nFeatures) {
        // Default to the feature with the highest score (or PSI) anywhere: the one worth looking at.
        let best = 0; let bestV = -1;
        rows.forEach((d) => d.features.forEach((f) => { const v = scoreOf(d, f) ?? f.psi; if (v > bestV) { bestV = v; best = f.index; } }));
        driftUi.feature = String(best);
      }
      fillSelect($('#dr-feature'), Array.from({ length: nFeatures }, (_, i) => [String(i), profile ? `${i}: ${name(i)}` : `feature ${i}`]), driftUi.feature);

      const predScore = (d) => {
        const t = profile && thresholdsFor(profile, d.samples);
        return t && d.prediction_psi !== null && d.prediction_psi !== undefined ? ratio(d.prediction_psi, t.prediction_psi) : null;
      };
      const topFeatures = (d) => {
        if (!profile) return h`<span class="muted small">—</span>`;
        const top = d.features.map((f) => [f.index, scoreOf(d, f)]).filter((x) => x[1] !== null).sort((a, b) => b[1] - a[1]).slice(0, 3);
        return top.map(([i, sc], k) => h`${k ? ', ' : ''}<a href="#" data-feature="${i}" class="${sc > 1 ? 'bad' : ''}" title="feature ${i}: choose it below">${name(i)}</a> <span class="muted small">${fmtNum(sc)}</span>`);
      };
      const summaryTable = (list, first, firstCell) => h`<div class="table-wrap"><table class="list">
        <thead><tr><th>${first}</th><th>Verdict</th><th>Max score</th><th>Highest-scoring features</th><th>Drifted features</th><th title="PSI of the predicted-class (or output-value) histogram, and its score">Prediction PSI (score)</th><th>Windows (flagged)</th><th>Samples</th><th>Last window</th></tr></thead>
        <tbody>${list.map((d) => {
          const ps = predScore(d);
          return h`<tr class="${d.drifted ? 'row-bad' : ''}"><td>${firstCell(d)}</td>
          <td>${d.drifted ? h`<span class="badge bad">drifted</span>` : h`<span class="badge ok">ok</span>`}${d.rescored ? '' : h` <span class="muted small" title="no profile: scores are the devices' own">not re-scored</span>`}</td>
          <td>${fmtNum(d.max_score)}</td><td>${topFeatures(d)}</td><td>${d.features.filter((f) => f.drifted).length} of ${d.features.length} (${fmtNum(100 * d.drifted_share, 0)} %)</td>
          <td>${fmtNum(d.prediction_psi, 3)}${ps !== null ? h` <span class="muted small">(${fmtNum(ps)})</span>` : ''}</td><td>${fmtCount(d.windows)} (${fmtCount(d.flagged_windows)})</td><td>${fmtNum(d.samples)}</td><td title="${fmtTime(d.last_ms)}">${ago(d.last_ms)}</td></tr>`;
        })}</tbody></table></div>`;
      const used = profile ? [...new Set(rows.map((d) => (thresholdsFor(profile, d.samples) || {}).window).filter(Boolean))].sort((a, b) => a - b) : [];
      const usedText = !used.length ? '' : used.length === 1 ? ` (here the ${fmtCount(used[0])}-sample thresholds)` : ` (here the ${fmtCount(used[0])}- to ${fmtCount(used[used.length - 1])}-sample thresholds)`;
      setHTML($('#dr-summary'), h`<div class="card"><h2>Per device</h2>
          <p class="muted small">Each device's ${driftUi.window}-sample windows of ${driftUi.model}@${driftUi.version} (release ${drift.release}) merged and re-scored against the reference profile as one long window. Score = PSI over the threshold calibrated for that many samples${usedText}: above 1 is past it. A feature counts as drifted only if its effect size also passes the profile's floor.</p>
          ${summaryTable(rows, 'Device', (d) => h`<a href="${link(['devices', d.device])}">${d.device}</a>`)}
          ${allRows.length > rows.length ? h`<p class="muted small">The ${rows.length} devices with the highest scores, of ${allRows.length}.</p>` : ''}</div>
        ${driftUi.label ? h`<div class="card"><h2>Per cohort (${driftUi.label})</h2>${cohorts.length ? summaryTable(cohorts, driftUi.label, (c) => h`<strong>${c.value}</strong> <span class="muted small">${c.devices.length > 4 ? `${c.devices.length} devices` : c.devices.join(', ')}</span>`) : h`<p class="muted">No device with drift data has the label ${driftUi.label}.</p>`}</div>` : ''}`);

      // Heat map: rows are devices (and cohorts), columns features; colour by score (PSI over its
      // threshold; PSI itself without a profile), ● when drifted.
      const heatRow = (label, d) => h`<tr><th>${label}</th>${Array.from({ length: nFeatures }, (_, i) => {
        const f = d.features.find((x) => x.index === i);
        if (!f) return h`<td class="hm na"></td>`;
        const sc = scoreOf(d, f);
        const lvl = sc !== null ? scoreLevel(sc) : psiLevel(f.psi);
        return h`<td class="hm l${lvl}${String(i) === driftUi.feature ? ' sel' : ''}" data-feature="${i}" title="${label} · ${name(i)} (feature ${i}): ${sc !== null ? `score ${fmtNum(sc, 2)}, ` : ''}PSI ${fmtNum(f.psi, 4)}, effect ${fmtNum(f.effect, 2)} sd${f.cusum_alarms ? `, ${f.cusum_alarms} CUSUM alarms` : ''}${f.drifted ? ' — drifted' : ''}">${f.drifted ? '●' : ''}</td>`;
      })}</tr>`;
      const legend = profile
        ? h`Score (PSI / threshold): <span class="hm l0">&lt;0.25</span> <span class="hm l1">&lt;0.5</span> <span class="hm l2">&lt;0.75</span> <span class="hm l3">&lt;1</span> <span class="hm l4">≥1</span>`
        : h`PSI (no reference profile, so no thresholds): <span class="hm l0">&lt;0.02</span> <span class="hm l1">&lt;0.05</span> <span class="hm l2">&lt;0.1</span> <span class="hm l3">&lt;0.25</span> <span class="hm l4">≥0.25</span>`;
      setHTML($('#dr-heat'), h`<div class="table-wrap"><table class="heat"><thead><tr><th></th>${Array.from({ length: nFeatures }, (_, i) => h`<th title="${name(i)}">${i}</th>`)}</tr></thead>
        <tbody>${rows.map((d) => heatRow(d.device, d))}${cohorts.map((c) => heatRow(`${driftUi.label}=${c.value}`, c))}</tbody></table></div>
        <p class="muted small">${legend} · ● the feature drifted (past its threshold with an effect above the floor, or a CUSUM alarm). Hover a cell for the feature's name and figures; click it to choose the feature.</p>`);

      // The chosen feature: over time and the current histogram from the followed devices'
      // newest drift items (GET …/drift returns no counts), against the reference histogram.
      const feature = Number(driftUi.feature);
      const fp = profile ? profile.features[feature] : null;
      // Follow the highest-scoring devices, skipping those whose newest drift items all came
      // after their last window of this version and length (they moved on: nothing to show).
      const sel = `${driftUi.model}/${drift.release}/${driftUi.window}`;
      const followed = allRows.filter((d) => !movedOn.has(`${d.device}/${sel}`))
        .sort((a, b) => b.max_score - a.max_score).slice(0, DRIFT_DEVICES);
      // With a cohort label: the cohorts with the highest scores (at most COHORT_CHART_VALUES),
      // each followed through its COHORT_DEVICES highest-scoring devices, for the charts over time.
      const rowOf = new Map(allRows.map((d) => [d.device, d]));
      const allCohorts = driftUi.label ? (drift.cohorts || []).filter((c) => String(c.window_len) === driftUi.window) : [];
      const chartCohorts = allCohorts.slice().sort((a, b) => b.max_score - a.max_score).slice(0, COHORT_CHART_VALUES)
        .sort((a, b) => String(a.value).localeCompare(String(b.value), 'en', { numeric: true }))
        .map((c) => ({
          value: c.value,
          members: c.devices.length,
          followed: c.devices.map((id) => rowOf.get(id)).filter((d) => d && !movedOn.has(`${d.device}/${sel}`))
            .sort((a, b) => b.max_score - a.max_score).slice(0, COHORT_DEVICES),
        }));
      // One fetch per device, whichever chart follows it (newestItems caches, at most every 10 s).
      const wanted = new Map(followed.map((d) => [d.device, d]));
      chartCohorts.forEach((c) => c.followed.forEach((d) => wanted.set(d.device, d)));
      const fetched = new Map(await Promise.all([...wanted.values()].map((d) => newestItems(d.device, 'drift', DRIFT_ITEMS, DRIFT_ITEMS_EVERY_MS)
        .then((items) => {
          const mine = items.filter((i) => i.body.model === driftUi.model && i.body.release === drift.release && String(i.body.window) === driftUi.window);
          if (!mine.length && items.length && items[0].body.ended_at_ms > (d.last_ms || 0)) movedOn.add(`${d.device}/${sel}`);
          return [d.device, mine];
        }))));
      if (!alive(g)) return;
      const perDevice = followed.map((d) => [d.device, fetched.get(d.device) || []]);
      const fwOf = (i) => (i.body.features || []).find((x) => x.index === feature);
      const itemFeatureScore = (i) => {
        const f = fwOf(i);
        if (!f) return null;
        if (!fp) return f.psi;
        if (f.counts.length !== fp.proportions.length) return null;
        return featureScore(profile, i.body.samples, feature, psiOf(f.counts, fp.proportions));
      };
      const psiSeries = perDevice.map(([dev, items]) => ({ name: dev, points: items.map((i) => { const v = itemFeatureScore(i); return v === null ? null : [i.body.ended_at_ms, v]; }).filter(Boolean) }));
      const itemWindowScore = (i) => { const v = profile ? windowScore(profile, i.body) : i.body.max_score; return v === undefined ? null : v; };
      const scoreSeries = perDevice.map(([dev, items]) => ({ name: dev, points: items.map((i) => { const v = itemWindowScore(i); return v === null ? null : [i.body.ended_at_ms, v]; }).filter(Boolean) }));
      setHTML($('#dr-cohort-time'), cohortCharts({ chartCohorts, allCohorts, fetched, itemWindowScore, itemFeatureScore, featureTitle: name(feature), profile }));
      const counts = [];
      let nWindows = 0; let samples = 0; let sum = 0; let sumSq = 0;
      perDevice.forEach(([, items]) => items.forEach((i) => {
        const f = fwOf(i);
        if (!f || (fp && f.counts.length !== fp.proportions.length)) return;
        nWindows += 1;
        samples += i.body.samples;
        sum += f.sum; sumSq += f.sum_sq;
        f.counts.forEach((c, b) => { counts[b] = (counts[b] || 0) + c; });
      }));
      const total = counts.reduce((a, c) => a + (c || 0), 0);
      const lastWindow = Math.max(...allRows.map((d) => d.last_ms || 0));
      const noRecent = `no ${driftUi.window}-sample window of this version among the followed devices' newest ${DRIFT_ITEMS} drift items (its last window: ${ago(lastWindow)})`;
      let histogram;
      let figures = '';
      if (fp) {
        const bins = binLabels(fp.edges);
        const current = bins.map((_, b) => (total ? (100 * (counts[b] || 0)) / total : 0));
        histogram = histChart({
          title: `${name(feature)}: reference and current`,
          bins,
          series: [
            { name: `reference (${fmtCount(profile.rows)} training rows)`, cls: 'h-ref', values: fp.proportions.map((p) => 100 * p) },
            ...(total ? [{ name: `current (${fmtCount(total)} values)`, cls: 'h-cur', values: current }] : []),
          ],
          note: total ? '' : `No current histogram: ${noRecent}.`,
        });
        if (total) {
          const full = counts.length === fp.proportions.length ? counts.map((c) => c || 0) : null;
          const psi = full ? psiOf(full, fp.proportions) : null;
          const t = thresholdsFor(profile, samples);
          const sc = psi !== null && t ? ratio(psi, t.psi[feature]) : null;
          const m = effectOf(total, sum, sumSq, fp.mean, fp.std);
          figures = h`<div class="card half"><h3>${name(feature)} <span class="muted small">feature ${feature}</span></h3>
            <table class="list kv"><tbody>
              <tr><th>Reference</th><td>mean ${fmtNum(fp.mean)}, sd ${fmtNum(fp.std)}, range ${fmtNum(fp.min)} to ${fmtNum(fp.max)}${fp.missing_rate ? `, ${fmtNum(100 * fp.missing_rate, 1)} % missing` : ''}</td></tr>
              <tr><th>Current</th><td>${m ? h`mean ${fmtNum(m.mean)}, sd ${fmtNum(m.sd)} · effect ${fmtNum(m.effect)} sd` : '—'} <span class="muted small">(${plural(nWindows, 'window')}, ${fmtCount(samples)} samples, ${plural(perDevice.filter(([, it]) => it.length).length, 'device')})</span></td></tr>
              <tr><th>PSI</th><td>${psi !== null ? fmtNum(psi, 4) : '—'}${t ? h` · threshold ${fmtNum(t.psi[feature], 4)} for ${fmtCount(t.window)}-sample windows · effect floor ${fmtNum(t.effect_floor)} sd` : ''}</td></tr>
              <tr><th>Score</th><td>${sc !== null ? h`<strong class="${sc > 1 ? 'bad' : 'ok'}">${fmtNum(sc)}</strong> ${sc > 1 ? 'past the threshold' : 'within the threshold'}` : 'not judged: fewer samples than the shortest calibrated window'}</td></tr>
            </tbody></table>
            <p class="muted small">These windows merged, scored as drift.rs scores a merged window: PSI of the counts (half a pseudo-count per bin) against the reference proportions, over the threshold of the longest calibrated window length not above the merged sample count.</p></div>`;
        }
      } else {
        const bars = total ? counts.map((c, b) => ({ label: b === 0 ? 'below min' : b === counts.length - 1 ? 'above max' : `bin ${b}`, value: (100 * (c || 0)) / total, flag: b === 0 || b === counts.length - 1 })) : [];
        histogram = h`${barChart({ title: `Current histogram of feature ${feature}`, unit: '%', bars, fmt: (v) => fmtNum(v, 1), note: total ? '' : 'no recent window' })}
          <div class="chart-empty"><strong>Reference histogram</strong><span>${record && record.profile_sha256 ? `The server has no reference profile for ${driftUi.model}@${driftUi.version}.` : `${driftUi.model}@${driftUi.version} ships no reference profile.`}</span></div>`;
      }
      setHTML($('#dr-feature-view'), h`
        ${histogram}${figures}
        ${lineChart({ title: `${name(feature)}: ${profile ? 'score per window' : 'PSI per window'}`, unit: profile ? 'PSI / threshold' : '', series: psiSeries, empty: noRecent })}
        ${lineChart({ title: 'Window drift score, as the gate computes it', unit: '', series: scoreSeries, empty: noRecent })}
        <p class="muted small full">Current histogram and series: the ${plural(followed.length, 'device')} with the highest drift score${allRows.length > followed.length ? ` (of ${allRows.length}; devices that have since moved to another version are skipped)` : ''}, over their newest ${DRIFT_ITEMS} drift items each (any version and window length; ${plural(nWindows, 'window')} of this one). Window scores include the prediction's class and confidence histograms, as the gate does.</p>`);
    },
    fail(e) { setHTML($('#dr-summary'), errorBox(errorText(e))); },
  };

  // ---- boot -----------------------------------------------------------------------------

  const PAGES = {
    overview,
    devices: devicesPage,
    device: devicePage,
    models: modelsPage,
    rollouts: rolloutsPage,
    rollout: rolloutPage,
    drift: driftPage,
  };

  function startApp() {
    renderWho();
    route();
  }

  window.addEventListener('hashchange', () => { if (session.me) route(); });
  document.addEventListener('DOMContentLoaded', async () => {
    $('#signout').addEventListener('click', () => signOut('Signed out.', true));
    if (!session.token) { renderSignIn(''); return; }
    try {
      await loadMe();
      startApp();
    } catch (e) {
      if (e.status === 401) return; // api() already showed the sign-in form with the reason
      renderSignIn(`Could not check your token: ${errorText(e)}`);
      // Keep the token: a network blip should not sign the user out.
      session.token = sessionStorage.getItem(TOKEN_KEY) || '';
    }
  });
})();
