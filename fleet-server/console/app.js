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
 * API additions this console would want (it shows what exists and says what is missing):
 *  1. GET /api/v1/models/{name}/{version}/profile → the reference profile JSON
 *     (ReferenceProfile: features[].name/edges/proportions, thresholds[].psi per window).
 *     Without it the drift page cannot draw the reference histogram, name features, or turn
 *     a feature's PSI into a score (psi / threshold).
 *  2. Per-feature drift counts in GET …/drift: {"features": [{"index", "psi", "counts": [..],
 *     "missing", "score"}]}; the merged counts are there server-side but not returned, so the
 *     current histogram is rebuilt here from each device's recent drift items.
 *  3. GET /api/v1/devices/{id}/items?newest=true (or since_ms=): items come oldest first only;
 *     for "recent" items the console starts from after_id = acked_up_to - N (item ids are one
 *     sequence per device across kinds), which is an approximation.
 *  4. Assignments in GET /api/v1/devices ({"devices": [{..., "assignments": [{model, version}]}]}):
 *     the overview's compliance uses the target the device itself reports (state.models[].target)
 *     because the server-side assignment is only on GET /devices/{id}; a directive the device has
 *     not accepted yet therefore does not show as "behind".
 *  5. The number of devices a rollout's selector matched, on GET /rollouts/{id} (it is only in the
 *     rollout_created audit entry's details.devices, which the stage bars read).
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
  const MAX_POINTS = 600; // per chart series: enough for ~10 min at 1 report/s
  const RECENT_ITEMS = 4000; // how far back (in item ids) "recent" telemetry/health reaches
  const RECENT_DRIFT_ITEMS = 500; // drift windows are large (counts per feature): look back less
  const DRIFT_DEVICES = 6; // devices whose drift items the drift page follows
  const DRIFT_TABLE_ROWS = 50; // devices (and cohorts) in the drift tables and heat map

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
  const plural = (n, one, many = one + 's') => `${n} ${n === 1 ? one : many}`;

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

  function parseRoute() {
    const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    const [head, ...rest] = parts;
    if (head === 'devices' && rest.length) return { name: 'device', nav: 'devices', params: { id: rest.join('/') } };
    if (head === 'rollouts' && rest.length) return { name: 'rollout', nav: 'rollouts', params: { id: rest.join('/') } };
    if (head === 'drift') return { name: 'drift', nav: 'drift', params: { model: rest[0], version: rest[1] } };
    if (['overview', 'devices', 'models', 'rollouts'].includes(head)) return { name: head, nav: head, params: {} };
    return null;
  }

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
      const dot = pts.length === 1 ? h`<circle class="s${i % 6}" cx="${sx(pts[0][0]).toFixed(1)}" cy="${sy(pts[0][1]).toFixed(1)}" r="3"></circle>` : '';
      return h`<path class="line s${i % 6}" d="${d.trim()}"><title>${s.name}</title></path>${dot}`;
    });
    const legend = series.length > 1 || (series[0] && series[0].name)
      ? h`<div class="legend">${series.map((s, i) => h`<span class="key"><i class="sw s${i % 6}"></i>${s.name}</span>`)}</div>` : '';
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

  // ---- item cache: recent outbox items per device and kind, fetched incrementally --------

  const itemCache = new Map(); // `${device}/${kind}` → {after, items}

  /**
   * Recent items of one kind for a device. The first call starts `lookback` ids before the
   * device's acked_up_to (ids are one sequence per device, so that is roughly "the last N items
   * of any kind"); later calls ask only for ids after the newest one seen.
   */
  async function recentItems(device, kind, ackedUpTo, lookback, keep = MAX_POINTS) {
    const key = `${device}/${kind}`;
    let c = itemCache.get(key);
    if (!c) {
      c = { after: lookback === Infinity ? 0 : Math.max(0, (ackedUpTo || 0) - lookback), items: [] };
      itemCache.set(key, c);
    }
    for (let page = 0; page < 5; page += 1) {
      const q = `kind=${encodeURIComponent(kind)}&after_id=${c.after}&limit=2000`;
      const res = await api(`/devices/${encodeURIComponent(device)}/items?${q}`);
      const items = res.items || [];
      if (items.length) {
        c.items.push(...items);
        c.after = items[items.length - 1].id;
        if (c.items.length > keep) c.items.splice(0, c.items.length - keep);
      }
      if (items.length < 2000) break;
    }
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
      const [devs, rolls, models] = await Promise.all([api('/devices'), api('/rollouts'), api('/models')]);
      if (!alive(g)) return;
      const devices = devs.devices || [];
      const counts = { online: 0, offline: 0, never: 0, revoked: 0 };
      devices.forEach((d) => { counts[presenceOf(d)] += 1; });
      setHTML($('#ov-presence'), devices.length ? h`
        <div class="card stat"><span class="num">${devices.length}</span><span>devices enrolled</span></div>
        <div class="card stat ok"><span class="num">${counts.online}</span><span>online</span></div>
        <div class="card stat warn"><span class="num">${counts.offline}</span><span>offline</span></div>
        <div class="card stat"><span class="num">${counts.never}</span><span>never seen</span></div>
        ${counts.revoked ? h`<div class="card stat bad"><span class="num">${counts.revoked}</span><span>revoked</span></div>` : ''}`
        : emptyState('No devices enrolled yet — enroll one with fleetctl device enroll'));

      const active = (rolls.rollouts || []).filter((r) => ACTIVE_PHASES.has(r.phase));
      const finished = (rolls.rollouts || []).filter((r) => !ACTIVE_PHASES.has(r.phase)).slice(0, 3); // newest first
      setHTML($('#ov-rollouts'), h`${active.length ? rolloutTable(active) : h`<p class="muted">No active rollout.</p>`}
        ${finished.length ? h`<h3 class="sub-h">Recently finished</h3>${rolloutTable(finished)}` : ''}
        <p class="small"><a href="#/rollouts">All rollouts</a></p>`);

      // Per model: versions running (active on a device) and compliance against the target.
      const byModel = new Map();
      const entry = (name) => {
        if (!byModel.has(name)) byModel.set(name, { versions: new Map(), comp: { on_target: 0, updating: 0, failed: 0, behind: 0 }, noTarget: 0, detail: { updating: [], failed: [], behind: [] } });
        return byModel.get(name);
      };
      (models.models || []).forEach((m) => entry(m.name));
      devices.filter((d) => !d.revoked_at_ms).forEach((d) => {
        modelStates(d).forEach((ms) => {
          const e = entry(ms.name);
          const v = ms.active ? ms.active.version : null;
          if (v) e.versions.set(v, (e.versions.get(v) || 0) + 1);
          const c = compliance(ms);
          if (!c) { e.noTarget += 1; return; }
          e.comp[c] += 1;
          if (e.detail[c]) e.detail[c].push(d.id);
        });
      });
      const registry = new Map();
      (models.models || []).forEach((m) => { registry.set(m.name, (registry.get(m.name) || []).concat(m)); });
      const cards = [...byModel.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([name, e]) => {
        const total = e.comp.on_target + e.comp.updating + e.comp.failed + e.comp.behind;
        const versions = [...e.versions.entries()].sort((a, b) => b[1] - a[1]);
        const regVersions = (registry.get(name) || []).length;
        const who = (list) => (list.length ? h` <span class="muted small">(${list.slice(0, 8).map((id, i) => h`${i ? ', ' : ''}<a href="${link(['devices', id])}">${id}</a>`)}${list.length > 8 ? ` +${list.length - 8}` : ''})</span>` : '');
        return h`<div class="card model-card">
          <h3>${name} <span class="muted small">${plural(regVersions, 'version')} in the registry</span></h3>
          <p><strong>Running:</strong> ${versions.length ? versions.map(([v, n], i) => h`${i ? ' · ' : ''}<span class="chip">${v}</span> on ${plural(n, 'device')}`) : h`<span class="muted">no device runs it</span>`}</p>
          ${total ? h`
            ${progressBar([
              { cls: 'seg-installed', value: e.comp.on_target, title: 'on target' },
              { cls: 'seg-pending', value: e.comp.updating, title: 'updating' },
              { cls: 'seg-failed', value: e.comp.failed, title: 'failed' },
              { cls: 'seg-behind', value: e.comp.behind, title: 'behind' }], total, `${name} compliance`)}
            <ul class="legend-list">
              <li><i class="sw seg-installed"></i>on target: ${e.comp.on_target}</li>
              <li><i class="sw seg-pending"></i>updating: ${e.comp.updating}${who(e.detail.updating)}</li>
              <li><i class="sw seg-failed"></i>failed: ${e.comp.failed}${who(e.detail.failed)}</li>
              <li><i class="sw seg-behind"></i>behind: ${e.comp.behind}${who(e.detail.behind)}</li>
            </ul>
            <p class="muted small">Of ${plural(total, 'device')} with a known target (the version its last accepted directive asked for).${e.noTarget ? ` ${e.noTarget} more report the model without a target.` : ''}</p>`
            : h`<p class="muted">No device reports a target for this model.</p>`}
        </div>`;
      });
      const silent = devices.filter((d) => !d.revoked_at_ms && !d.state).length;
      setHTML($('#ov-models'), cards.length ? h`<div class="cards wide">${cards}</div>
        ${silent ? h`<p class="muted small">${plural(silent, 'enrolled device')} ${silent === 1 ? 'has' : 'have'} not reported a state yet, so ${silent === 1 ? 'it is' : 'they are'} not counted above.</p>` : ''}`
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

  // ---- page: devices --------------------------------------------------------------------

  const deviceUi = { label: '', status: '', version: '', page: 0 };
  let deviceList = [];

  const devicesPage = {
    mount(root) {
      root.innerHTML = String(h`
        <h1>Devices</h1>
        <form class="filters card" id="device-filters" autocomplete="off">
          <label>Labels <input id="df-labels" type="search" placeholder="site=berlin, hw=rpi4" value="${deviceUi.label}"></label>
          <label>Status <select id="df-status">
            ${['', 'online', 'offline', 'never', 'revoked'].map((s) => h`<option value="${s}"${deviceUi.status === s ? raw(' selected') : ''}>${s === '' ? 'any' : s === 'never' ? 'never seen' : s}</option>`)}
          </select></label>
          <label>Version <select id="df-version"><option value="">any</option></select></label>
        </form>
        <section id="device-table"><p class="loading">Loading…</p></section>`);
      const rerender = () => { deviceUi.page = 0; renderDeviceTable(); };
      $('#df-labels').addEventListener('input', (e) => { deviceUi.label = e.target.value; rerender(); });
      $('#df-status').addEventListener('change', (e) => { deviceUi.status = e.target.value; rerender(); });
      $('#df-version').addEventListener('change', (e) => { deviceUi.version = e.target.value; rerender(); });
      $('#device-filters').addEventListener('submit', (e) => e.preventDefault());
      $('#device-table').addEventListener('click', (e) => {
        const b = e.target.closest('button[data-page]');
        if (!b) return;
        deviceUi.page += b.dataset.page === 'next' ? 1 : -1;
        renderDeviceTable();
      });
    },
    async refresh(_p, g) {
      const res = await api('/devices');
      if (!alive(g)) return;
      deviceList = res.devices || [];
      // Version options: every model@version active somewhere, kept in order; selection kept.
      const versions = new Set();
      deviceList.forEach((d) => modelStates(d).forEach((ms) => { if (ms.active) versions.add(`${ms.name}@${ms.active.version}`); }));
      const opts = ['', ...[...versions].sort(), '-'];
      fillSelect($('#df-version'), opts.map((v) => [v, v === '' ? 'any' : v === '-' ? 'no active model' : v]), deviceUi.version);
      renderDeviceTable();
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

  /** Device filter: comma/space-separated terms, each key=value, key (has the label), or id text. */
  function deviceMatches(d) {
    const terms = deviceUi.label.split(/[,\s]+/).map((t) => t.trim()).filter(Boolean);
    for (const t of terms) {
      const i = t.indexOf('=');
      if (i > 0) {
        if ((d.labels || {})[t.slice(0, i)] !== t.slice(i + 1)) return false;
      } else if (!(t in (d.labels || {})) && !d.id.toLowerCase().includes(t.toLowerCase())) return false;
    }
    if (deviceUi.status && presenceOf(d) !== deviceUi.status) return false;
    if (deviceUi.version) {
      const active = modelStates(d).filter((ms) => ms.active).map((ms) => `${ms.name}@${ms.active.version}`);
      if (deviceUi.version === '-' ? active.length > 0 : !active.includes(deviceUi.version)) return false;
    }
    return true;
  }

  function renderDeviceTable() {
    const el = $('#device-table');
    if (!el) return;
    if (!deviceList.length) { setHTML(el, emptyState('No devices enrolled yet — enroll one with fleetctl device enroll')); return; }
    const rows = deviceList.filter(deviceMatches);
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
    deviceUi.page = Math.min(Math.max(deviceUi.page, 0), pages - 1);
    const start = deviceUi.page * PAGE_SIZE;
    const shown = rows.slice(start, start + PAGE_SIZE); // only the current page is rendered
    const pager = h`<div class="pager">
      <button type="button" class="btn small" data-page="prev"${deviceUi.page === 0 ? raw(' disabled') : ''}>‹ Previous</button>
      <span>${rows.length ? `${start + 1}–${start + shown.length} of ${rows.length}` : '0'}${rows.length !== deviceList.length ? ` (filtered from ${deviceList.length})` : ''} · page ${deviceUi.page + 1} of ${pages}</span>
      <button type="button" class="btn small" data-page="next"${deviceUi.page >= pages - 1 ? raw(' disabled') : ''}>Next ›</button></div>`;
    setHTML(el, rows.length ? h`<div class="table-wrap"><table class="list devices">
      <thead><tr><th>Device</th><th>Status</th><th>Labels</th><th>Models (active)</th><th>Last seen</th><th>CPU</th><th>Memory</th><th>Agent</th></tr></thead>
      <tbody>${shown.map((d) => {
        const p = presenceOf(d);
        const hl = d.health || {};
        return h`<tr data-device="${d.id}">
          <td><a href="${link(['devices', d.id])}">${d.id}</a></td>
          <td>${presenceBadge(p)}</td>
          <td>${labelChips(d.labels)}</td>
          <td>${modelStates(d).map((ms) => h`<div>${ms.name}: <strong>${ms.active ? ms.active.version : '—'}</strong>${ms.phase && ms.phase.phase !== 'idle' && ms.phase.phase !== 'active' ? h` ${phaseCell(ms.phase)}` : ''}</div>`)}</td>
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
        recentItems(id, 'telemetry', acked, RECENT_ITEMS),
        recentItems(id, 'health', acked, RECENT_ITEMS),
        recentItems(id, 'event', acked, Infinity, 200), // events are few and never evicted
        recentItems(id, 'evictions', acked, Infinity, 50),
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
          <thead><tr><th>Model</th><th>Active</th><th>Target</th><th>Previous</th><th>Install phase</th><th>Compliance</th><th>On disk</th></tr></thead>
          <tbody>${modelStates(d).map((ms) => {
            const c = compliance(ms);
            const ref = (r) => (r ? h`${r.version} <span class="muted small">r${r.release}</span>` : h`<span class="muted">—</span>`);
            return h`<tr><td>${ms.name}</td><td><strong>${ref(ms.active)}</strong></td><td>${ref(ms.target)}</td><td>${ref(ms.previous)}</td>
              <td>${phaseCell(ms.phase)}</td><td>${c ? h`<span class="badge inst-${c}">${c.replace('_', ' ')}</span>` : '—'}</td>
              <td>${(ms.installed || []).map((r) => r.version).join(', ') || '—'}</td></tr>`;
          })}</tbody></table></div>` : h`<p class="muted">${st ? 'The device reports no model.' : 'The device has not reported its state yet.'}</p>`}
        <h3>Assignments (server side)</h3>
        ${assignments.length ? h`<ul>${assignments.map((a) => h`<li>${a.model}@${a.version} <span class="muted">since ${fmtTime(a.assigned_at_ms)}</span></li>`)}</ul>` : h`<p class="muted">No model assigned.</p>`}`);

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
        <p class="muted small full">The last ${plural(telemetry.length, 'telemetry report')} and ${plural(health.length, 'health report')} (recent items only). GPU and network-rate series are not part of the agent's reports.</p>`);

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
      const [res, devs] = await Promise.all([api('/models'), api('/devices')]);
      const models = res.models || [];
      // Manifests never change for a name@version: fetch each once.
      const missing = models.filter((m) => !modelDetail.has(`${m.name}@${m.version}`));
      for (let i = 0; i < missing.length; i += 6) {
        await Promise.all(missing.slice(i, i + 6).map(async (m) => {
          try { modelDetail.set(`${m.name}@${m.version}`, await api(`/models/${encodeURIComponent(m.name)}/${encodeURIComponent(m.version)}`)); } catch (e) { if (e.status === 401) throw e; }
        }));
      }
      if (!alive(g)) return;
      if (!models.length) { setHTML($('#md-list'), emptyState('No model in the registry yet — push one with fleetctl model push')); return; }
      const running = new Map(); // name@version → device ids with it active
      (devs.devices || []).forEach((d) => modelStates(d).forEach((ms) => {
        if (!ms.active) return;
        const k = `${ms.name}@${ms.active.version}`;
        running.set(k, (running.get(k) || []).concat(d.id));
      }));
      const names = [...new Set(models.map((m) => m.name))].sort();
      setHTML($('#md-list'), names.map((name) => {
        const versions = models.filter((m) => m.name === name).sort((a, b) => b.release - a.release);
        return h`<div class="card"><h2>${name}</h2><div class="table-wrap"><table class="list">
          <thead><tr><th>Version</th><th>Release</th><th>Size</th><th>SHA-256</th><th>Profile</th><th>Signed by</th><th>Created</th><th>Pushed</th><th>Runs on</th></tr></thead>
          <tbody>${versions.map((m) => {
            const det = modelDetail.get(`${m.name}@${m.version}`);
            const man = det && det.manifest;
            const on = running.get(`${m.name}@${m.version}`) || [];
            return h`<tr data-model="${m.name}@${m.version}"><td><strong>${m.version}</strong></td><td>${m.release}</td><td class="nw">${fmtBytes(m.size)}</td>
              <td>${shortHash(m.sha256)}</td>
              <td>${m.profile_sha256 ? h`${shortHash(m.profile_sha256, 8)} <a href="${link(['drift', m.name, m.version])}">drift</a>` : h`<span class="muted">none (no drift)</span>`}</td>
              <td>${det ? h`<code>${det.signed_by}</code>` : '—'}</td>
              <td class="nw">${man ? fmtTime(man.created_at_ms) : '—'}</td><td class="nw">${fmtTime(m.pushed_at_ms)}</td>
              <td>${on.length ? h`${plural(on.length, 'device')}: ${on.slice(0, 10).map((id, i) => h`${i ? ', ' : ''}<a href="${link(['devices', id])}">${id}</a>`)}${on.length > 10 ? ` +${on.length - 10} more` : ''}` : h`<span class="muted">nowhere</span>`}</td></tr>
              ${man ? h`<tr class="sub"><td></td><td colspan="8" class="muted small">inputs ${man.inputs.map((t) => `${t.name} ${t.datatype}[${t.shape.join('×')}]`).join(', ')} → outputs ${man.outputs.map((t) => `${t.name} ${t.datatype}[${t.shape.join('×')}]`).join(', ')}${man.min_agent_version ? ` · needs agent ≥ ${man.min_agent_version}` : ''}</td></tr>` : ''}`;
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

  // ---- page: drift ----------------------------------------------------------------------

  const driftUi = { model: '', version: '', label: '', window: '', feature: '' };

  const driftPage = {
    mount(root, params) {
      if (params.model) { driftUi.model = params.model; driftUi.version = params.version || ''; driftUi.feature = ''; }
      root.innerHTML = String(h`<h1>Drift</h1>
        <form class="filters card" id="drift-filters" autocomplete="off">
          <label>Model <select id="dr-model"></select></label>
          <label>Version <select id="dr-version"></select></label>
          <label>Cohorts by label <select id="dr-label"><option value="">none</option></select></label>
          <label>Window length <select id="dr-window"></select></label>
          <label>Feature <select id="dr-feature"></select></label>
        </form>
        <section id="dr-summary"><p class="loading">Loading…</p></section>
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
      $('#dr-heat').addEventListener('click', (e) => {
        const td = e.target.closest('td[data-feature]');
        if (td) { driftUi.feature = td.dataset.feature; tick(); }
      });
    },
    async refresh(_p, g) {
      const [models, devs] = await Promise.all([api('/models'), api('/devices')]);
      if (!alive(g)) return;
      const list = models.models || [];
      if (!list.length) {
        setHTML($('#dr-summary'), emptyState('No model in the registry yet — push one with fleetctl model push'));
        setHTML($('#dr-heat'), ''); setHTML($('#dr-feature-view'), '');
        return;
      }
      const names = [...new Set(list.map((m) => m.name))].sort();
      if (!names.includes(driftUi.model)) driftUi.model = names[0];
      fillSelect($('#dr-model'), names.map((n) => [n, n]), driftUi.model);
      const versions = list.filter((m) => m.name === driftUi.model).sort((a, b) => b.release - a.release);
      if (!versions.some((m) => m.version === driftUi.version)) {
        // Default to the newest version some device runs, else the newest.
        const running = new Set();
        (devs.devices || []).forEach((d) => modelStates(d).forEach((ms) => { if (ms.name === driftUi.model && ms.active) running.add(ms.active.version); }));
        driftUi.version = (versions.find((m) => running.has(m.version)) || versions[0]).version;
      }
      fillSelect($('#dr-version'), versions.map((m) => [m.version, `${m.version} (release ${m.release})`]), driftUi.version);
      const labelKeys = [...new Set((devs.devices || []).flatMap((d) => Object.keys(d.labels || {})))].sort();
      fillSelect($('#dr-label'), [['', 'none'], ...labelKeys.map((k) => [k, k])], driftUi.label);
      const record = versions.find((m) => m.version === driftUi.version);

      const q = driftUi.label ? `?label=${encodeURIComponent(driftUi.label)}` : '';
      const drift = await api(`/models/${encodeURIComponent(driftUi.model)}/${encodeURIComponent(driftUi.version)}/drift${q}`);
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
        setHTML($('#dr-heat'), ''); setHTML($('#dr-feature-view'), '');
        fillSelect($('#dr-feature'), [['', '—']], '');
        return;
      }
      const nFeatures = Math.max(...rows.map((d) => d.features.length));
      if (driftUi.feature === '' || Number(driftUi.feature) >= nFeatures) {
        // Default to the feature with the highest PSI anywhere: the one worth looking at.
        let best = 0; let bestPsi = -1;
        rows.forEach((d) => d.features.forEach((f) => { if (f.psi > bestPsi) { bestPsi = f.psi; best = f.index; } }));
        driftUi.feature = String(best);
      }
      fillSelect($('#dr-feature'), Array.from({ length: nFeatures }, (_, i) => [String(i), `feature ${i}`]), driftUi.feature);

      const summaryTable = (list, first, firstCell) => h`<div class="table-wrap"><table class="list">
        <thead><tr><th>${first}</th><th>Verdict</th><th>Max score</th><th>Drifted features</th><th>Prediction PSI</th><th>Windows (flagged)</th><th>Samples</th><th>Last window</th></tr></thead>
        <tbody>${list.map((d) => h`<tr class="${d.drifted ? 'row-bad' : ''}"><td>${firstCell(d)}</td>
          <td>${d.drifted ? h`<span class="badge bad">drifted</span>` : h`<span class="badge ok">ok</span>`}${d.rescored ? '' : h` <span class="muted small" title="no profile: scores are the devices' own">not re-scored</span>`}</td>
          <td>${fmtNum(d.max_score)}</td><td>${d.features.filter((f) => f.drifted).length} of ${d.features.length} (${fmtNum(100 * d.drifted_share, 0)} %)</td>
          <td>${fmtNum(d.prediction_psi, 3)}</td><td>${d.windows} (${d.flagged_windows})</td><td>${fmtNum(d.samples)}</td><td title="${fmtTime(d.last_ms)}">${ago(d.last_ms)}</td></tr>`)}</tbody></table></div>`;
      setHTML($('#dr-summary'), h`<div class="card"><h2>Per device</h2>
          <p class="muted small">Each device's ${driftUi.window}-sample windows of ${driftUi.model}@${driftUi.version} (release ${drift.release}) merged and re-scored against the reference profile. Score = PSI over its calibrated threshold: above 1 is past it.</p>
          ${summaryTable(rows, 'Device', (d) => h`<a href="${link(['devices', d.device])}">${d.device}</a>`)}
          ${allRows.length > rows.length ? h`<p class="muted small">The ${rows.length} devices with the highest scores, of ${allRows.length}.</p>` : ''}</div>
        ${driftUi.label ? h`<div class="card"><h2>Per cohort (${driftUi.label})</h2>${cohorts.length ? summaryTable(cohorts, driftUi.label, (c) => h`<strong>${c.value}</strong> <span class="muted small">${c.devices.length > 4 ? `${c.devices.length} devices` : c.devices.join(', ')}</span>`) : h`<p class="muted">No device with drift data has the label ${driftUi.label}.</p>`}</div>` : ''}`);

      // Heat map: rows are devices (and cohorts), columns features; colour by PSI, ● when drifted.
      const heatRow = (name, d) => h`<tr><th>${name}</th>${Array.from({ length: nFeatures }, (_, i) => {
        const f = d.features.find((x) => x.index === i);
        if (!f) return h`<td class="hm na"></td>`;
        const lvl = f.psi < 0.02 ? 0 : f.psi < 0.05 ? 1 : f.psi < 0.1 ? 2 : f.psi < 0.25 ? 3 : 4;
        return h`<td class="hm l${lvl}${String(i) === driftUi.feature ? ' sel' : ''}" data-feature="${i}" title="${name} · feature ${i}: PSI ${fmtNum(f.psi, 4)}, effect ${fmtNum(f.effect, 2)} sd${f.cusum_alarms ? `, ${f.cusum_alarms} CUSUM alarms` : ''}${f.drifted ? ' — drifted' : ''}">${f.drifted ? '●' : ''}</td>`;
      })}</tr>`;
      setHTML($('#dr-heat'), h`<div class="table-wrap"><table class="heat"><thead><tr><th></th>${Array.from({ length: nFeatures }, (_, i) => h`<th>${i}</th>`)}</tr></thead>
        <tbody>${rows.map((d) => heatRow(d.device, d))}${cohorts.map((c) => heatRow(`${driftUi.label}=${c.value}`, c))}</tbody></table></div>
        <p class="muted small">PSI: <span class="hm l0">&lt;0.02</span> <span class="hm l1">&lt;0.05</span> <span class="hm l2">&lt;0.1</span> <span class="hm l3">&lt;0.25</span> <span class="hm l4">≥0.25</span> · ● the feature drifted (past its calibrated threshold, or CUSUM alarm). Click a cell to choose its feature. Feature names are in the reference profile, which the API does not expose.</p>`);

      // Over time and the current histogram: from the devices' own drift items (see note 2).
      const feature = Number(driftUi.feature);
      const followed = allRows.slice().sort((a, b) => b.max_score - a.max_score).slice(0, DRIFT_DEVICES);
      const acked = new Map((devs.devices || []).map((d) => [d.id, d.acked_up_to || 0]));
      const perDevice = await Promise.all(followed.map((d) => recentItems(d.device, 'drift', acked.get(d.device), RECENT_DRIFT_ITEMS, 300)
        .then((items) => [d.device, items.filter((i) => i.body.model === driftUi.model && i.body.release === drift.release && String(i.body.window) === driftUi.window)])));
      if (!alive(g)) return;
      const psiSeries = perDevice.map(([dev, items]) => ({ name: dev, points: items.map((i) => { const f = i.body.features.find((x) => x.index === feature); return f ? [i.body.ended_at_ms, f.psi] : null; }).filter(Boolean) }));
      const scoreSeries = perDevice.map(([dev, items]) => ({ name: dev, points: items.map((i) => [i.body.ended_at_ms, i.body.max_score]) }));
      const counts = [];
      let nWindows = 0;
      perDevice.forEach(([, items]) => items.forEach((i) => {
        const f = i.body.features.find((x) => x.index === feature);
        if (!f) return;
        nWindows += 1;
        f.counts.forEach((c, b) => { counts[b] = (counts[b] || 0) + c; });
      }));
      const total = counts.reduce((a, c) => a + (c || 0), 0);
      const binLabel = (b, n) => (b === 0 ? 'below min' : b === n - 1 ? 'above max' : `bin ${b}`);
      const bars = total ? counts.map((c, b) => ({ label: binLabel(b, counts.length), value: (100 * (c || 0)) / total, flag: b === 0 || b === counts.length - 1 })) : [];
      const lastWindow = Math.max(...allRows.map((d) => d.last_ms || 0));
      const noRecent = `no ${driftUi.window}-sample window of this version among the followed devices' recent items (its last window: ${ago(lastWindow)}; the items API cannot seek by time)`;
      setHTML($('#dr-feature-view'), h`
        ${lineChart({ title: `Feature ${feature}: PSI per window`, unit: '', series: psiSeries, empty: noRecent })}
        ${lineChart({ title: 'Window drift score (all features)', unit: 'max PSI / threshold', series: scoreSeries, empty: noRecent })}
        <div class="chart-empty half"><strong>Reference histogram of feature ${feature}</strong>
          <span>Not available: the API does not expose ${driftUi.model}@${driftUi.version}'s reference profile (${record && record.profile_sha256 ? `sha256 ${record.profile_sha256.slice(0, 12)}…` : 'none shipped'}). It needs GET /api/v1/models/{name}/{version}/profile.</span></div>
        ${barChart({ title: `Current histogram of feature ${feature}`, unit: '%', bars, fmt: (v) => fmtNum(v, 1), note: total ? `${fmtNum(total)} samples in the last ${plural(nWindows, 'window')} of ${plural(followed.length, 'device')}; bins are the reference profile's deciles, the outer two out of the training range.` : 'no recent window' })}
        <p class="muted small full">Over-time series follow the ${plural(followed.length, 'device')} with the highest drift score${allRows.length > followed.length ? ` (of ${allRows.length})` : ''}, over their recent drift items.</p>`);
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
