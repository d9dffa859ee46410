// Pairvisor's browser console. It speaks gRPC-Web to the same public API as pvctl (the
// serving controller translates gRPC-Web to gRPC in front of the token guard), decoding
// messages with the API's own .proto, and keeps its views live from WatchEvents.
'use strict';

(() => {
  const SERVICE = '/pairvisor.v1.Pairvisor/';
  const TOKEN_KEY = 'pairvisor-token';
  let types = null;

  // ---------------------------------------------------------------- gRPC-Web

  /** An API error: the gRPC status code and the server's message. */
  class RpcError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }
  const UNAUTHENTICATED = 16;
  const FAILED_PRECONDITION = 9;

  async function loadTypes() {
    const text = await (await fetch('/console/api.proto')).text();
    const root = protobuf.parse(text, { keepCase: false }).root;
    const service = root.lookupService('pairvisor.v1.Pairvisor');
    const methods = {};
    for (const [name, m] of Object.entries(service.methods)) {
      m.resolve();
      methods[name] = { request: m.resolvedRequestType, response: m.resolvedResponseType };
    }
    return { root, methods };
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }

  function frame(bytes) {
    const out = new Uint8Array(5 + bytes.length);
    new DataView(out.buffer).setUint32(1, bytes.length);
    out.set(bytes, 5);
    return out;
  }

  function parseTrailers(bytes) {
    const trailers = {};
    for (const line of new TextDecoder().decode(bytes).split('\r\n')) {
      const at = line.indexOf(':');
      if (at > 0) trailers[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).trim();
    }
    return trailers;
  }

  function statusError(status, message) {
    let text = message || '';
    try { text = decodeURIComponent(text); } catch (_) { /* keep it as sent */ }
    return new RpcError(Number(status), text || `gRPC status ${status}`);
  }

  /** Calls `method`; `onMessage` gets each response message as a plain object, `onHeaders`
   * (if any) the response's headers first. */
  async function rpc(method, request, onMessage, signal, onHeaders) {
    const m = types.methods[method];
    const body = frame(m.request.encode(m.request.fromObject(request || {})).finish());
    const response = await fetch(SERVICE + method, {
      method: 'POST',
      headers: {
        'content-type': 'application/grpc-web+proto',
        'x-grpc-web': '1',
        authorization: 'Bearer ' + token(),
      },
      body,
      signal,
    });
    if (!response.ok) throw new RpcError(14, `HTTP ${response.status} from the controller`);
    const early = response.headers.get('grpc-status');
    if (early !== null && early !== '0') {
      throw statusError(early, response.headers.get('grpc-message'));
    }
    if (onHeaders) onHeaders(response.headers);
    const reader = response.body.getReader();
    let buffer = new Uint8Array(0);
    let trailers = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const joined = new Uint8Array(buffer.length + value.length);
      joined.set(buffer);
      joined.set(value, buffer.length);
      buffer = joined;
      while (buffer.length >= 5) {
        const length = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
        if (buffer.length < 5 + length) break;
        const flag = buffer[0];
        const payload = buffer.slice(5, 5 + length);
        buffer = buffer.slice(5 + length);
        if (flag & 0x80) {
          trailers = parseTrailers(payload);
        } else {
          onMessage(m.response.toObject(m.response.decode(payload), {
            enums: String, longs: Number, defaults: true, oneofs: true,
          }));
        }
      }
    }
    const status = trailers ? trailers['grpc-status'] : early;
    if (status === undefined || status === null) {
      throw new RpcError(14, 'the controller closed the call without a status');
    }
    if (status !== '0') throw statusError(status, trailers ? trailers['grpc-message'] : '');
  }

  /** A unary call: resolves to the response object. */
  async function call(method, request) {
    let result = null;
    try {
      await rpc(method, request, (message) => { result = message; });
    } catch (e) {
      if (e.code === UNAUTHENTICATED) showLogin(e.message);
      throw e;
    }
    return result;
  }

  // ---------------------------------------------------------------- state

  const state = {
    caller: null,
    health: '',
    nodes: [],
    capacity: null,
    quorum: [],
    vms: [],
    alerts: [],
    alertError: '',
    isos: [],
    events: [],
    live: false,
    // Per host and A-Link: the last counters seen and the throughput derived from them.
    alinkSeen: {},
    alinkRate: {},
    lastRevision: 0,
  };
  const MAX_EVENTS = 500;

  function short(enumName, prefix) {
    return String(enumName || '').replace(prefix, '');
  }

  function esc(value) {
    return String(value === undefined || value === null ? '' : value)
      .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
      .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
  }

  function time(ms) {
    return ms ? new Date(Number(ms)).toLocaleTimeString() : '';
  }

  function bytes(n) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let v = Number(n) || 0;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function noteAlinks(nodes, now) {
    for (const node of nodes) {
      for (const link of node.alinks || []) {
        const key = `${node.name}/${link.name}`;
        const total = Number(link.bytesSent) + Number(link.bytesReceived);
        const seen = state.alinkSeen[key];
        if (seen && now > seen.at && total >= seen.total) {
          state.alinkRate[key] = ((total - seen.total) * 8) / ((now - seen.at) / 1000) / 1e6;
        }
        state.alinkSeen[key] = { at: now, total };
      }
    }
  }

  let refreshing = false;
  let refreshAgain = false;

  /** Reloads the pair's state from the API and re-renders. */
  async function refresh() {
    if (refreshing) { refreshAgain = true; return; }
    refreshing = true;
    try {
      const [nodes, vms, alerts, isos] = await Promise.all([
        call('ListNodes', {}), call('ListVms', {}), call('ListAlerts', {}), call('ListIsos', {}),
      ]);
      noteAlinks(nodes.nodes, Date.now());
      state.nodes = nodes.nodes;
      state.capacity = nodes.capacity;
      state.quorum = nodes.quorum;
      state.vms = vms.vms;
      state.alerts = alerts.alerts;
      state.isos = isos.isos;
      try {
        state.health = (await (await fetch('/health')).text()).trim();
      } catch (_) {
        state.health = 'UNREACHABLE';
      }
      render(false);
    } catch (e) {
      console.warn('refresh failed', e);
    } finally {
      refreshing = false;
      if (refreshAgain) { refreshAgain = false; setTimeout(refresh, 0); }
    }
  }

  let refreshTimer = null;
  function refreshSoon() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 150);
  }

  let watch = null;
  /** Follows WatchEvents, resuming after the last revision when the stream breaks. */
  function startWatch() {
    if (watch) return;
    const mine = new AbortController();
    watch = mine;
    const since = state.lastRevision ? state.lastRevision + 1 : 0;
    setLive(true);
    rpc('WatchEvents', { sinceRevision: since }, (event) => {
      state.lastRevision = Math.max(state.lastRevision, event.revision);
      state.events.unshift(event);
      if (state.events.length > MAX_EVENTS) state.events.length = MAX_EVENTS;
      refreshSoon();
    }, mine.signal, (headers) => {
      // Events after this revision follow: resume from it even if none came before a break.
      const after = Number(headers.get('x-pairvisor-revision'));
      if (after > state.lastRevision) state.lastRevision = after;
    }).catch((e) => {
      console.warn('event stream ended', e);
      if (e.code === UNAUTHENTICATED) showLogin(e.message);
      // The revision was compacted away: start over from now.
      if (e.code === FAILED_PRECONDITION) state.lastRevision = 0;
    }).finally(() => {
      if (watch !== mine) return; // logged out (and maybe in again) meanwhile
      watch = null;
      setLive(false);
      // The serving controller may have moved: the system IP follows it.
      if (token()) setTimeout(() => { startWatch(); refreshSoon(); }, 1000);
    });
  }

  function setLive(live) {
    state.live = live;
    const el = document.getElementById('live');
    el.textContent = live ? 'live' : 'offline';
    el.className = 'badge ' + (live ? 'up' : 'down');
  }

  // ---------------------------------------------------------------- views

  function route() {
    const hash = location.hash || '#/';
    if (hash.startsWith('#/vm/')) return { view: 'vm', vm: decodeURIComponent(hash.slice(5)) };
    if (hash === '#/create') return { view: 'create' };
    if (hash === '#/events') return { view: 'events' };
    return { view: 'dashboard' };
  }

  let shown = null;

  /** Renders the current view; `navigated`: the route changed, so rebuild it whole. */
  function render(navigated) {
    const status = document.getElementById('pair-status');
    status.textContent = state.health || '…';
    status.className = 'badge ' + ({ OK: 'ok', WARNING: 'warn' }[state.health] || 'bad');
    const r = route();
    const key = JSON.stringify(r);
    if (navigated || shown !== key) {
      closeSerial();
      closeScreen();
      shown = key;
      const view = document.getElementById('view');
      if (r.view === 'vm') view.innerHTML = vmFrame(r.vm);
      else if (r.view === 'create') view.innerHTML = createForm();
      else if (r.view === 'events') view.innerHTML = eventsFrame();
      else view.innerHTML = '<div id="dashboard"></div>';
      if (r.view === 'vm') openVm(r.vm);
      if (r.view === 'create') bindCreate();
      if (r.view === 'events') bindEvents();
    }
    if (r.view === 'vm') renderVm(r.vm);
    else if (r.view === 'events') renderEvents();
    else if (r.view === 'dashboard') renderDashboard();
  }

  function hostCard(node) {
    const nodeState = short(node.state, 'NODE_STATE_');
    const paths = (node.paths || []).map((p) => `<li data-path="${esc(p.name)}">${esc(p.name)}
      <span class="state ${p.up ? 'up' : 'down'}">${p.up ? 'up' : 'silent'}</span>
      <span class="muted">${p.msSinceHeard === null || p.msSinceHeard === undefined ? '' : esc(p.msSinceHeard) + ' ms ago'}</span></li>`).join('');
    const alinks = (node.alinks || []).map((l) => {
      const rate = state.alinkRate[`${node.name}/${l.name}`];
      return `<tr data-alink="${esc(l.name)}"><td>${esc(l.name)}</td>
        <td><span class="state ${l.up ? 'up' : 'down'}">${l.up ? 'up' : 'down'}</span></td>
        <td>${rate === undefined ? '…' : rate.toFixed(2) + ' Mbit/s'}</td>
        <td>${esc(bytes(l.bytesSent))} / ${esc(bytes(l.bytesReceived))}</td>
        <td>${esc(l.retransmits)}</td>
        <td>${l.rttUs === null || l.rttUs === undefined ? '' : esc(l.rttUs) + ' µs'}</td></tr>`;
    }).join('');
    return `<div class="host" data-node="${esc(node.name)}">
      <h2>${esc(node.name)} <span class="state ${esc(nodeState)}">${esc(nodeState)}</span>
        <span class="muted">${esc(short(node.role, 'NODE_ROLE_').toLowerCase())}</span></h2>
      <div class="reason muted">${esc(node.stateReason)}</div>
      <div>${esc(node.cpus)} CPUs, ${esc(bytes(Number(node.memoryMib) * 1048576))}, ${esc(node.runningVms)} VMs running</div>
      <div>agent <span class="state ${node.agentUp ? 'up' : 'down'}">${node.agentUp ? 'up' : 'down'}</span>
        controller <span class="state ${node.controllerUp ? 'up' : 'down'}">${node.controllerUp ? 'up' : 'down'}</span>
        lease <span class="state ${node.leaseAlive ? 'up' : 'down'}">${node.leaseAlive ? 'alive' : 'gone'}</span></div>
      <h2>Heartbeat paths</h2><ul class="paths">${paths || '<li class="muted">none reported</li>'}</ul>
      <h2>A-Links</h2>
      <table class="alinks"><tr><th>link</th><th>state</th><th>throughput</th><th>sent / received</th><th>retransmits</th><th>RTT</th></tr>
      ${alinks || '<tr><td colspan="6" class="muted">none reported</td></tr>'}</table>
    </div>`;
  }

  function protectionText(vm) {
    if (vm.ft && vm.ft.phase && vm.ft.phase !== 'FT_PHASE_INVALID' && short(vm.mode, 'PROTECTION_MODE_') === 'FT') {
      return short(vm.ft.phase, 'FT_PHASE_');
    }
    const p = vm.protection;
    if (!p || !p.state) return '';
    return p.state.toUpperCase() + (p.state === 'syncing' ? ` ${p.syncPercent}%` : '');
  }

  function vmRows(vms) {
    return vms.map((vm) => {
      const vmState = short(vm.state, 'VM_STATE_');
      const protection = protectionText(vm);
      const epochs = vm.ft && vm.ft.epochsPerSecond !== null && vm.ft.epochsPerSecond !== undefined
        ? Number(vm.ft.epochsPerSecond).toFixed(1) : '';
      return `<tr data-vm="${esc(vm.name)}"><td><a href="#/vm/${encodeURIComponent(vm.name)}">${esc(vm.name)}</a></td>
        <td>${esc(short(vm.mode, 'PROTECTION_MODE_'))}</td>
        <td><span class="state ${esc(vmState)}">${esc(vmState)}</span></td>
        <td>${esc(vm.node)}</td>
        <td><span class="state ${esc(protection.split(' ')[0])}">${esc(protection)}</span></td>
        <td>${esc(epochs)}</td></tr>`;
    }).join('');
  }

  function eventRows(events) {
    return events.map((e) => `<tr data-kind="${esc(short(e.kind, 'EVENT_KIND_'))}"><td>${esc(time(e.unixMs))}</td>
      <td>${esc(short(e.kind, 'EVENT_KIND_'))}</td><td>${esc(e.vmName)}</td><td>${esc(e.node)}</td>
      <td>${esc(e.message)}</td></tr>`).join('');
  }

  /** The open alerts, each with a Clear button for an admin (ClearAlert by its ID). */
  function alertsTable(id) {
    const rows = state.alerts.map((a) => `<tr data-alert="${esc(a.id)}"><td>${esc(time(a.raisedUnixMs))}</td>
      <td>${esc(a.id)}</td><td>${esc(a.message)}</td>
      <td>${isAdmin() ? `<button type="button" data-clear-alert="${esc(a.id)}">Clear</button>` : ''}</td></tr>`).join('');
    return `<table id="${id}"><tr><th>raised</th><th>alert</th><th>message</th><th></th></tr>
      ${rows || '<tr><td colspan="4" class="muted">none</td></tr>'}</table>
      <p class="error" id="${id}-error">${esc(state.alertError)}</p>`;
  }

  /** Clears the alert whose button was clicked; the API says whether it could. */
  async function clearAlert(button) {
    const id = button.dataset.clearAlert;
    button.disabled = true;
    try {
      await call('ClearAlert', { id });
      state.alerts = state.alerts.filter((a) => a.id !== id);
      state.alertError = '';
    } catch (e) {
      state.alertError = e.message;
    }
    render(false);
    refreshSoon();
  }

  function renderDashboard() {
    const el = document.getElementById('dashboard');
    if (!el) return;
    const cap = state.capacity;
    const quorum = state.quorum.map((m) => `<span class="member" data-member="${esc(m.name)}">${esc(state.nodes.some((n) => n.name === m.name) ? m.name : `${m.name} (witness)`)}
      <span class="state ${m.up ? 'up' : 'down'}">${m.up ? 'up' : 'down'}</span>${m.leader ? ' <span class="muted">leader</span>' : ''}</span>`).join(' ');
    el.innerHTML = `<h1>The pair</h1>
      <div id="hosts" class="hosts">${state.nodes.map(hostCard).join('')}</div>
      <h2>Quorum (etcd on both hosts and the witness)</h2>
      <div id="quorum">${quorum || '<span class="muted">not reported</span>'}</div>
      <h2>Open alerts</h2>
      ${alertsTable('alerts')}
      <h2>Virtual machines</h2>
      <p class="muted">${cap ? `free for new VMs: ${esc(cap.freeVcpus)} vCPUs, ${esc(cap.freeMemoryMib)} MiB` : ''}</p>
      <table id="vms"><tr><th>name</th><th>mode</th><th>state</th><th>host</th><th>protection</th><th>FT epochs/s</th></tr>
      ${vmRows(state.vms) || '<tr><td colspan="6" class="muted">no VMs yet: <a href="#/create">create one</a></td></tr>'}</table>
      <h2>Recent events</h2>
      <table id="recent-events"><tr><th>time</th><th>kind</th><th>VM</th><th>host</th><th>what</th></tr>
      ${eventRows(state.events.slice(0, 15)) || '<tr><td colspan="5" class="muted">none since this page opened</td></tr>'}</table>`;
  }

  // -------- VM page

  function vmFrame(name) {
    return `<h1>VM ${esc(name)}</h1>
      <div class="actions">
        <button type="button" data-action="StartVm">Start</button>
        <button type="button" data-action="ShutdownVm">Shut down</button>
        <button type="button" data-action="PowerOffVm">Power off</button>
        <button type="button" data-action="CreateSnapshot">Snapshot</button>
        <select id="vm-mode"><option value="PROTECTION_MODE_FT">FT</option>
          <option value="PROTECTION_MODE_HA">HA</option>
          <option value="PROTECTION_MODE_UNPROTECTED">unprotected</option></select>
        <button type="button" data-action="ModifyVm">Change mode</button>
        <button type="button" data-action="DeleteVm">Delete</button>
      </div>
      <p id="vm-error" class="error"></p>
      <div id="vm-details"></div>
      <h2>Serial console</h2>
      <div id="serial"></div>
      <h2>Screen</h2>
      <p id="screen-note" class="muted"></p>
      <div id="vnc"></div>
      <img id="screen" alt="the VM's screen">`;
  }

  function openVm(name) {
    for (const button of document.querySelectorAll('.actions button')) {
      button.addEventListener('click', () => vmAction(name, button.dataset.action));
    }
    openSerial(name);
    openScreen(name);
  }

  // -------- screen: live over VNC for an admin (noVNC on the controller's /vnc websocket,
  // which only admins may open), else QMP screendumps through ScreenshotVm, refreshed.

  let screen = null;
  const SCREEN_PERIOD_MS = 2000;
  // After a VNC session failed to open or dropped, screenshots until the next try.
  const VNC_RETRY_MS = 10000;

  function isAdmin() {
    return state.caller && short(state.caller.role, 'ROLE_') === 'ADMIN';
  }

  function openScreen(name) {
    screen = { name, url: null, timer: null, closed: false, rfb: null, vncAfter: 0 };
    const s = screen;
    const take = async () => {
      if (s.closed) return;
      const vm = state.vms.find((v) => v.name === name);
      const note = document.getElementById('screen-note');
      const running = vm && short(vm.state, 'VM_STATE_') === 'RUNNING';
      if (vm && short(vm.mode, 'PROTECTION_MODE_') === 'FT') {
        // FT domains have no video device (a checkpoint would have to carry its state).
        note.textContent = 'an FT VM has no screen: use its serial console';
      } else if (running && s.rfb) {
        // Live: noVNC draws as the guest does.
      } else if (running && isAdmin() && window.RFB && Date.now() >= s.vncAfter) {
        openVnc(s, note);
      } else if (running) {
        await screenshot(s, note);
      } else {
        closeVnc(s);
        note.textContent = 'the VM is not running';
      }
      if (!s.closed) s.timer = setTimeout(take, SCREEN_PERIOD_MS);
    };
    take();
  }

  function openVnc(s, note) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/vnc/${encodeURIComponent(s.name)}`;
    const view = document.getElementById('vnc');
    // A browser cannot set headers on a websocket: the token rides as a subprotocol.
    const rfb = new window.RFB(view, url, { wsProtocols: ['binary', 'pairvisor.token.' + token()] });
    rfb.scaleViewport = true;
    rfb.addEventListener('connect', () => {
      if (s.rfb !== rfb) return;
      view.dataset.connected = '1';
      document.getElementById('screen').hidden = true;
      note.textContent = 'live (VNC): click into the screen to type';
    });
    rfb.addEventListener('disconnect', (ev) => {
      if (s.rfb !== rfb) return;
      s.rfb = null;
      s.vncAfter = Date.now() + VNC_RETRY_MS;
      delete view.dataset.connected;
      document.getElementById('screen').hidden = false;
      if (!s.closed) note.textContent = ev.detail.clean ? 'the screen session ended' : 'the screen connection failed; showing screenshots';
    });
    s.rfb = rfb;
    note.textContent = 'connecting to the screen…';
  }

  function closeVnc(s) {
    if (!s.rfb) return;
    const rfb = s.rfb;
    s.rfb = null;
    rfb.disconnect();
  }

  async function screenshot(s, note) {
    try {
      const shot = await call('ScreenshotVm', { vm: s.name });
      if (s.closed) return;
      const url = URL.createObjectURL(new Blob([shot.png], { type: 'image/png' }));
      document.getElementById('screen').src = url;
      if (s.url) URL.revokeObjectURL(s.url);
      s.url = url;
      note.textContent = `as of ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      note.textContent = e.message;
    }
  }

  function closeScreen() {
    if (!screen) return;
    screen.closed = true;
    clearTimeout(screen.timer);
    closeVnc(screen);
    if (screen.url) URL.revokeObjectURL(screen.url);
    screen = null;
  }

  async function vmAction(name, action) {
    const error = document.getElementById('vm-error');
    error.textContent = '';
    const request = { vm: name };
    if (action === 'DeleteVm' && !confirm(`Delete VM ${name} and its disks?`)) return;
    if (action === 'ModifyVm') request.mode = document.getElementById('vm-mode').value;
    if (action === 'CreateSnapshot') request.description = 'from the console';
    try {
      await call(action, request);
      if (action === 'DeleteVm') location.hash = '#/';
      refreshSoon();
    } catch (e) {
      error.textContent = `${action}: ${e.message}`;
    }
  }

  function field(label, value) {
    return `<tr><th>${esc(label)}</th><td>${value}</td></tr>`;
  }

  /** A run's durations per bucket (the API's buckets are cumulative), as bars. */
  function histogram(id, buckets, count, sumMs, what) {
    buckets = buckets || [];
    if (!buckets.length || !Number(count)) return '<span class="muted">none yet</span>';
    let below = 0;
    const bars = buckets.map((b) => {
      const n = Number(b.count) - below;
      below = Number(b.count);
      return { label: `≤ ${b.leMs} ms`, n };
    });
    bars.push({ label: `> ${buckets[buckets.length - 1].leMs} ms`, n: Number(count) - below });
    const most = Math.max(...bars.map((b) => b.n), 1);
    const mean = Number(sumMs) / Number(count);
    return `<table id="${id}" class="histogram">${bars.map((b) => `<tr data-bucket="${esc(b.label)}">
      <td>${esc(b.label)}</td><td><span class="bar"><span style="width:${(100 * b.n) / most}%"></span></span></td>
      <td>${esc(b.n)}</td></tr>`).join('')}</table>
      <span class="muted">${esc(count)} ${esc(what)}, mean ${esc(mean.toFixed(2))} ms</span>`;
  }

  function renderVm(name) {
    const el = document.getElementById('vm-details');
    if (!el) return;
    const vm = state.vms.find((v) => v.name === name);
    if (!vm) {
      el.innerHTML = `<p class="muted">No VM named ${esc(name)} (yet).</p>`;
      return;
    }
    const vmState = short(vm.state, 'VM_STATE_');
    const p = vm.protection || {};
    const mode = document.getElementById('vm-mode');
    if (mode && !mode.dataset.set) {
      // Start the mode picker at the VM's mode, once: later the admin's choice stays.
      mode.value = vm.mode;
      mode.dataset.set = '1';
    }
    const f = p.lastFailover;
    const rows = [
      field('state', `<span id="vm-state" class="state ${esc(vmState)}">${esc(vmState)}</span> <span class="muted">${esc(vm.stateReason)}</span>`),
      field('mode', esc(short(vm.mode, 'PROTECTION_MODE_'))),
      field('host', `<span id="vm-node">${esc(vm.node)}</span>`),
      field('UUID', esc(vm.uuid)),
      field('size', `${esc(vm.vcpus)} vCPUs, ${esc(vm.memoryMib)} MiB`),
      field('boots from', esc(vm.kernelImage ? `kernel image ${vm.kernelImage}` : vm.iso ? `ISO ${vm.iso}` : '')),
      field('protection', `<span id="vm-protection">${esc(protectionText(vm))}</span> <span class="muted">${esc(p.reason)}</span>`),
      field('current copies on', esc((p.currentOn || []).join(', '))),
    ];
    if (p.state === 'syncing') {
      rows.push(field('sync', `<span class="bar"><span style="width:${Number(p.syncPercent) || 0}%"></span></span>
        ${esc(p.syncPercent)}% ${esc(p.syncPhase)}, ${esc(bytes(p.syncDoneBytes))} of ${esc(bytes(p.syncTotalBytes))},
        ${esc(bytes(p.syncBytesPerSecond))}/s${p.syncEtaSeconds !== null && p.syncEtaSeconds !== undefined ? `, ETA ${esc(p.syncEtaSeconds)} s` : ''}`));
    }
    if ((p.diskWrites || []).length) {
      // Each write completes only once it is on both hosts: the mirror's write latency.
      rows.push(field('mirrored writes', `<span id="vm-writes">${(p.diskWrites || []).map((w) => Number(w.count)
        ? `${esc(w.device)}: ${esc(w.count)} writes, mean ${esc((1000 * Number(w.totalSeconds) / Number(w.count)).toFixed(2))} ms`
        : `${esc(w.device)}: none yet`).join('; ')}</span>`));
    }
    if (vm.ft && vm.ft.phase && vm.ft.phase !== 'FT_PHASE_INVALID') {
      const ft = vm.ft;
      rows.push(field('FT', `phase ${esc(short(ft.phase, 'FT_PHASE_'))},
        ${ft.epochsPerSecond === null || ft.epochsPerSecond === undefined ? '' : esc(Number(ft.epochsPerSecond).toFixed(1)) + ' epochs/s,'}
        ${ft.lastPauseMs === null || ft.lastPauseMs === undefined ? '' : 'last pause ' + esc(Number(ft.lastPauseMs).toFixed(1)) + ' ms,'}
        committed epoch ${esc(ft.committedEpoch)}${ft.waitingForMirror ? ', waiting for the disk mirror' : ''}
        <span class="error">${esc(ft.lastError)}</span>`));
      rows.push(field('checkpoint pauses', histogram('ft-pauses', ft.pauseHistogram, ft.pauseCount, ft.pauseSumMs, 'checkpoints')));
      rows.push(field('epoch lengths', histogram('ft-epochs', ft.epochHistogram, ft.epochCount, ft.epochSumMs, 'epochs')));
    }
    if (f && f.toNode) {
      rows.push(field('last failover', `<span id="vm-failover">${esc(f.fromNode)} → ${esc(f.toNode)}</span>
        at ${esc(time(f.decidedUnixMs))} (${esc(f.reason)})${f.runningUnixMs ? `, running after ${esc(Number(f.runningUnixMs) - Number(f.decidedUnixMs))} ms` : ''}`));
    }
    const disks = (vm.disks || []).map((d) => `<tr><td>${esc(d.index)}</td><td>${esc(bytes(d.sizeBytes))}</td>
      <td>${esc(short(d.format, 'DISK_FORMAT_'))}</td><td>${esc(d.storageGroup)}</td><td>${esc(d.volume)}</td></tr>`).join('');
    const nics = (vm.nics || []).map((n) => `<tr><td>${esc(n.network)}</td><td>${esc(n.mac)}</td></tr>`).join('');
    el.innerHTML = `<table class="fields">${rows.join('')}</table>
      <h2>Disks</h2><table><tr><th>#</th><th>size</th><th>format</th><th>storage group</th><th>volume</th></tr>${disks}</table>
      <h2>NICs</h2><table><tr><th>network</th><th>MAC</th></tr>${nics}</table>`;
  }

  // -------- serial console

  let serial = null;

  function openSerial(name) {
    const terminal = new Terminal({ convertEol: true, rows: 24, cols: 100, scrollback: 5000, disableStdin: true });
    terminal.open(document.getElementById('serial'));
    serial = { name, terminal, abort: null, closed: false };
    followSerial(serial, 65536);
  }

  function followSerial(s, tail) {
    if (s.closed) return;
    s.abort = new AbortController();
    rpc('StreamConsole', { vm: s.name, tailBytes: tail, follow: true }, (chunk) => {
      s.terminal.write(chunk.data);
    }, s.abort.signal).catch((e) => {
      if (!s.closed) s.terminal.write(`\r\n[console: ${e.message}]\r\n`);
    }).finally(() => {
      // The VM may have moved to the peer or been started: follow it again.
      if (!s.closed) setTimeout(() => followSerial(s, 0), 2000);
    });
  }

  function closeSerial() {
    if (!serial) return;
    serial.closed = true;
    if (serial.abort) serial.abort.abort();
    serial.terminal.dispose();
    serial = null;
  }

  // -------- create wizard

  function options(values, selected) {
    return values.map((v) => `<option value="${esc(v)}"${v === selected ? ' selected' : ''}>${esc(v)}</option>`).join('');
  }

  function union(key) {
    return [...new Set(state.nodes.flatMap((n) => n[key] || []))].sort();
  }

  function createForm() {
    const groups = [...new Set(state.nodes.flatMap((n) => (n.storageGroups || []).map((g) => g.name)))].sort();
    const isos = state.isos.filter((i) => i.state === 'ISO_STATE_READY').map((i) => i.name);
    return `<h1>Create a VM</h1>
      <form class="wizard" id="create">
        <label>Name <input id="c-name" required maxlength="64"></label>
        <label>Protection <select id="c-mode">
          <option value="PROTECTION_MODE_FT">FT: keeps running through a host failure</option>
          <option value="PROTECTION_MODE_HA" selected>HA: restarts on the peer, no write lost</option>
          <option value="PROTECTION_MODE_UNPROTECTED">unprotected</option></select></label>
        <label>vCPUs <input id="c-vcpus" type="number" min="1" value="1"></label>
        <label>Memory (MiB) <input id="c-memory" type="number" min="1" value="256"></label>
        <label>Disk (MiB) <input id="c-disk" type="number" min="1" value="16"></label>
        <label>Disk format <select id="c-format"><option value="DISK_FORMAT_RAW">raw</option>
          <option value="DISK_FORMAT_QCOW2">qcow2</option></select></label>
        <label>Storage group <select id="c-group">${options(groups, groups[0])}</select></label>
        <label>Network <select id="c-network"><option value="">none</option>${options(union('networks'), union('networks')[0])}</select></label>
        <label>Boot from <select id="c-boot">
          ${union('bootImages').map((b) => `<option value="kernel:${esc(b)}">kernel image ${esc(b)}</option>`).join('')}
          ${isos.map((i) => `<option value="iso:${esc(i)}">ISO ${esc(i)}</option>`).join('')}</select></label>
        <p><button id="c-submit" type="submit">Create</button></p>
        <p id="c-error" class="error"></p>
      </form>`;
  }

  function bindCreate() {
    document.getElementById('create').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const value = (id) => document.getElementById(id).value;
      const error = document.getElementById('c-error');
      error.textContent = '';
      const boot = value('c-boot');
      const request = {
        name: value('c-name').trim(),
        mode: value('c-mode'),
        vcpus: Number(value('c-vcpus')),
        memoryMib: Number(value('c-memory')),
        disks: [{ sizeBytes: Number(value('c-disk')) * 1048576, storageGroup: value('c-group'), format: value('c-format') }],
        networks: value('c-network') ? [value('c-network')] : [],
      };
      if (boot.startsWith('kernel:')) request.kernelImage = boot.slice(7);
      if (boot.startsWith('iso:')) request.iso = boot.slice(4);
      const submit = document.getElementById('c-submit');
      submit.disabled = true;
      try {
        const vm = await call('CreateVm', request);
        location.hash = '#/vm/' + encodeURIComponent(vm.name);
        refreshSoon();
      } catch (e) {
        // The API's own validation, shown where the admin is looking.
        error.textContent = e.message;
      } finally {
        submit.disabled = false;
      }
    });
  }

  // -------- event log

  function eventsFrame() {
    const kinds = types.root.lookupEnum('pairvisor.v1.EventKind').values;
    const names = Object.keys(kinds).filter((k) => kinds[k] !== 0).map((k) => short(k, 'EVENT_KIND_'));
    return `<h1>Events</h1>
      <div class="filters">kind <select id="f-kind"><option value="">any</option>${options(names, '')}</select>
        VM or host <input id="f-text" placeholder="name">
        <button id="f-clear" type="button">Clear the log</button></div>
      <h2>Open alerts</h2>
      <div id="event-alerts"></div>
      <h2>Log</h2>
      <table id="events"></table>`;
  }

  function bindEvents() {
    document.getElementById('f-kind').addEventListener('change', renderEvents);
    document.getElementById('f-text').addEventListener('input', renderEvents);
    document.getElementById('f-clear').addEventListener('click', () => { state.events = []; renderEvents(); });
  }

  function renderEvents() {
    const el = document.getElementById('events');
    if (!el) return;
    const kind = document.getElementById('f-kind').value;
    const text = document.getElementById('f-text').value.trim();
    const shownEvents = state.events.filter((e) => (!kind || short(e.kind, 'EVENT_KIND_') === kind)
      && (!text || e.vmName.includes(text) || e.node.includes(text)));
    el.innerHTML = `<tr><th>time</th><th>kind</th><th>VM</th><th>host</th><th>what</th></tr>${eventRows(shownEvents)}`;
    document.getElementById('event-alerts').innerHTML = alertsTable('event-alerts-table');
  }

  // ---------------------------------------------------------------- login

  function showLogin(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (watch) { watch.abort(); watch = null; setLive(false); }
    document.getElementById('login').hidden = false;
    document.getElementById('view').hidden = true;
    document.getElementById('logout').hidden = true;
    document.getElementById('who').textContent = '';
    document.getElementById('login-error').textContent = message || '';
  }

  async function logIn(secret) {
    sessionStorage.setItem(TOKEN_KEY, secret);
    try {
      state.caller = await call('WhoAmI', {});
    } catch (e) {
      showLogin(e.message);
      return;
    }
    document.getElementById('login').hidden = true;
    document.getElementById('view').hidden = false;
    document.getElementById('logout').hidden = false;
    document.getElementById('who').textContent = `${state.caller.name} (${short(state.caller.role, 'ROLE_').toLowerCase().replace('_', '-')})`;
    startWatch();
    await refresh();
    render(true);
  }

  async function main() {
    types = await loadTypes();
    document.getElementById('login-button').addEventListener('click', () => {
      logIn(document.getElementById('login-token').value.trim());
    });
    document.getElementById('login-token').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter') logIn(ev.target.value.trim());
    });
    document.getElementById('logout').addEventListener('click', () => showLogin(''));
    // Alert tables are redrawn on every refresh: one listener serves every Clear button.
    document.addEventListener('click', (ev) => {
      const button = ev.target.closest('button[data-clear-alert]');
      if (button) clearAlert(button);
    });
    window.addEventListener('hashchange', () => { if (token()) render(true); });
    setInterval(() => { if (token()) refresh(); }, 3000);
    if (token()) logIn(token());
    else showLogin('');
  }

  main().catch((e) => {
    document.getElementById('login').hidden = false;
    document.getElementById('login-error').textContent = `The console could not start: ${e.message}`;
  });
})();
