// ferry's dashboard: one snapshot of the fleet (GET /v1/dashboard), read again whenever the
// server says something changed (GET /v1/dashboard/events, server-sent events). No framework:
// four tables and a detail page, rendered from strings, fast enough for thousands of rows.
"use strict";

const params = new URLSearchParams(location.search);
const org = params.get("org");
// A token given in the address (#token=...) is kept for this tab only and removed from the
// address bar, so it is not left in history or screenshots.
function takeTokenFromHash() {
  const m = location.hash.match(/[#&]token=([^&]+)/);
  if (!m) return false;
  sessionStorage.setItem("ferryToken", decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search + "#/machines");
  return true;
}
takeTokenFromHash();

function headers() {
  const t = sessionStorage.getItem("ferryToken");
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(path) {
  const r = await fetch(path, { headers: headers() });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error(`${r.status} ${body.code || ""}: ${body.error || r.statusText}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

// No token, or one the server refuses: ask for one. Nothing of the fleet shows until then.
function askForToken(why) {
  document.getElementById("view").innerHTML = `<form id="token-form">
  <h2>An API token, please</h2>
  <p class="empty">${esc(why)}. Paste a token: the admin token <code>ferry dev</code> printed, or one
  from <code>ferry token create --org ORG</code>. It is kept for this browser tab only.</p>
  <input id="token-input" type="password" autocomplete="off" size="60"> <button>Use it</button>
</form>`;
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("ferryToken", document.getElementById("token-input").value.trim());
    tokenChanged();
    refresh();
  });
}
let tokenChanged = () => {};
// The event stream waits here after a 401 until a token is given.
const tokenSet = () => new Promise((res) => (tokenChanged = res));

const esc = (v) =>
  String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const bytes = (n) => {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log2(n) / 10));
  return `${(n / 2 ** (10 * i)).toFixed(i ? 1 : 0)} ${u[i]}`;
};
const ago = (ms) => (ms ? new Date(ms).toISOString().replace(".000Z", "Z") : "");

let snap = null;
let generation = 0;

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [tab, id] = h.split("/");
  return { tab: tab || "machines", id };
}

const views = {
  hosts(s) {
    if (!s.hosts.length) return `<p class="empty">No hosts registered.</p>`;
    const rows = s.hosts
      .map(
        (h) => `<tr data-host="${esc(h.id)}">
  <td class="mono">${esc(h.id)}</td><td>${esc(h.region)}</td>
  <td>${h.cordoned ? `<span class="badge cordoned">cordoned</span>` : `<span class="badge">schedulable</span>`}</td>
  <td class="num machines">${h.machines}</td><td class="mono">${esc(h.infra_prefix)}</td>
  <td><span class="route-count">${h.routes.length}</span><ul class="routes">${h.routes.map((r) => `<li class="mono">${esc(r)}</li>`).join("")}</ul></td>
</tr>`,
      )
      .join("");
    return `<table id="hosts"><thead><tr><th>Host</th><th>Region</th><th>Placement</th><th class="num">Machines</th><th>Infra prefix</th><th>Routes (one per other host)</th></tr></thead><tbody>${rows}</tbody></table>`;
  },

  machines(s) {
    const apps = s.apps.map((a) => `<span class="badge" data-app="${esc(a.name)}">${esc(a.name)} · ${esc(a.org)} · <span class="mono">${esc(a.network)}</span></span>`).join(" ");
    if (!s.machines.length) return `<p>${apps}</p><p class="empty">No machines.</p>`;
    // One string, one innerHTML: a thousand rows stay well under a frame budget per row.
    const rows = s.machines
      .map(
        (m) => `<tr data-machine="${esc(m.id)}">
  <td class="mono"><a href="#/machines/${esc(m.id)}">${esc(m.id)}</a></td><td>${esc(m.name)}</td><td>${esc(m.app)}</td>
  <td class="state state-${esc(m.state)}">${esc(m.state)}</td><td class="mono host">${esc(m.host)}</td>
  <td class="mono ip">${esc(m.private_ip)}</td><td class="mono instance">${esc(m.instance_id)}</td><td>${esc(m.region)}</td>
</tr>`,
      )
      .join("");
    return `<p>${apps}</p><table id="machines"><thead><tr><th>ID</th><th>Name</th><th>App</th><th>State</th><th>Host</th><th>Address</th><th>Instance</th><th>Region</th></tr></thead><tbody>${rows}</tbody></table>`;
  },

  migrations(s) {
    if (!s.migrations.length) return `<p class="empty">No migrations.</p>`;
    const rows = s.migrations
      .map((g) => {
        const copied = (g.stats.precopy_bytes || 0) + (g.stats.final_bytes || 0);
        const outcome = g.phase === "done" ? "moved" : g.phase === "rolled_back" ? `rolled back${g.rollback_from ? " from " + g.rollback_from : ""}` : "in progress";
        return `<tr data-migration="${esc(g.id)}">
  <td class="mono">${esc(g.id)}</td><td class="mono"><a href="#/machines/${esc(g.machine_id)}">${esc(g.machine_id)}</a></td><td>${esc(g.app)}</td>
  <td class="mono">${esc(g.from_host)} → ${esc(g.to_host)}</td><td class="state phase phase-${esc(g.phase)}">${esc(g.phase)}</td>
  <td class="num copied">${bytes(copied)}</td><td class="num downtime">${g.stats.downtime_ms == null ? "" : g.stats.downtime_ms + " ms"}</td>
  <td class="outcome">${esc(outcome)}${g.error ? `<div class="empty">${esc(g.error)}</div>` : ""}</td><td>${esc(ago(g.created_at_ms))}</td>
</tr>`;
      })
      .join("");
    return `<table id="migrations"><thead><tr><th>Migration</th><th>Machine</th><th>App</th><th>From → to</th><th>Phase</th><th class="num">Copied</th><th class="num">Downtime</th><th>Outcome</th><th>Started</th></tr></thead><tbody>${rows}</tbody></table>`;
  },

  bridge(s) {
    if (!s.bridge.length) return `<p class="empty">No bridge mappings: no machine has an old address to keep.</p>`;
    const rows = s.bridge
      .map(
        (b) => `<tr data-mapping="${esc(b.old)}">
  <td class="num">${b.network_id}</td><td class="mono old">${esc(b.old)}</td><td class="mono new">${esc(b.new)}</td>
  <td class="num hits">${b.hits}</td><td>${esc(ago(b.last_use))}</td>
  <td class="callers">${b.callers.map((c) => `<a class="mono" href="#/machines/${esc(c)}">${esc(c)}</a>`).join(" ")}</td>
  <td>${b.retired ? `<span class="badge">retired</span>` : b.retire_candidate ? `<span class="badge candidate">retire?</span>` : `<span class="badge">in use</span>`}</td>
</tr>`,
      )
      .join("");
    return `<table id="bridge"><thead><tr><th class="num">Network</th><th>Old address</th><th>Now at</th><th class="num">Hits</th><th>Last use</th><th>Calling machines</th><th>Status</th></tr></thead><tbody>${rows}</tbody></table>`;
  },
};

// The machine page: what the snapshot says, plus its events and output read on demand.
let detail = { id: null, html: "" };
async function machinePage(id) {
  const m = snap.machines.find((x) => x.id === id);
  if (!m) return `<p class="empty">Machine ${esc(id)} is not in this view (destroyed, or not yours).</p>`;
  const base = `/v1/apps/${encodeURIComponent(m.app)}/machines/${encodeURIComponent(id)}`;
  const [full, logs] = await Promise.all([api(base), api(base + "/logs?tail=200").catch((e) => ({ error: e.message, lines: [] }))]);
  const events = (full.events || [])
    .slice()
    .reverse()
    .map((e) => `<tr><td>${esc(ago(e.timestamp))}</td><td>${esc(e.type)}</td><td>${esc(e.status)}</td><td>${esc(e.source)}</td></tr>`)
    .join("");
  const lines = logs.lines.map((l) => `<span class="${esc(l.stream)}">${esc(l.timestamp)} ${esc(l.message)}</span>`).join("\n");
  const prev = (full.previous_instances || []).map((p) => `<li class="mono">${esc(p.instance_id)} on ${esc(p.host)} (${esc(p.private_ip)}) ${esc(p.state)}</li>`).join("");
  return `<h2><a href="#/machines">Machines</a> / <span class="mono">${esc(id)}</span></h2>
<table id="machine" data-machine="${esc(id)}"><tbody>
<tr><th>State</th><td class="state state-${esc(full.state)}">${esc(full.state)}</td></tr>
<tr><th>App</th><td>${esc(full.app)} (${esc(full.org)})</td></tr>
<tr><th>Host</th><td class="mono host">${esc(full.host)}</td></tr>
<tr><th>Address</th><td class="mono ip">${esc(full.private_ip)}</td></tr>
<tr><th>Instance</th><td class="mono instance">${esc(full.instance_id)}</td></tr>
</tbody></table>
${prev ? `<h2>Earlier instances</h2><ul>${prev}</ul>` : ""}
<h2>Logs</h2>${logs.error ? `<p class="empty">${esc(logs.error)}</p>` : ""}<pre class="logs" id="logs">${lines || '<span class="empty">no output yet</span>'}</pre>
<h2>Events</h2><table id="events"><thead><tr><th>Time</th><th>Type</th><th>Status</th><th>Source</th></tr></thead><tbody>${events}</tbody></table>`;
}

async function render() {
  if (!snap) return;
  const t0 = performance.now();
  const { tab, id } = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
  let html;
  try {
    html = tab === "machines" && id ? await machinePage(id) : (views[tab] || views.machines)(snap);
  } catch (e) {
    html = `<p class="empty">${esc(e.message)}</p>`;
  }
  document.getElementById("view").innerHTML = html;
  generation += 1;
  document.body.dataset.generation = String(generation);
  window.ferryRenderMs = performance.now() - t0;
}

let loading = null;
let again = false;
async function refresh() {
  // One read at a time; a change during a read asks for one more after it.
  if (loading) {
    again = true;
    return loading;
  }
  loading = (async () => {
    do {
      again = false;
      try {
        snap = await api("/v1/dashboard" + (org ? `?org=${encodeURIComponent(org)}` : ""));
        document.getElementById("updated").textContent = "updated " + snap.generated_at;
        await render();
      } catch (e) {
        if (e.status === 401) askForToken(sessionStorage.getItem("ferryToken") ? "The server refused this token" : "This dashboard needs a token");
        else document.getElementById("view").innerHTML = `<p class="empty">${esc(e.message)}</p>`;
      }
    } while (again);
    loading = null;
  })();
  return loading;
}

// Server-sent events through fetch (EventSource cannot send an Authorization header).
async function listen() {
  const live = document.getElementById("live");
  for (;;) {
    try {
      const r = await fetch("/v1/dashboard/events", { headers: headers() });
      if (r.status === 401) {
        live.className = "off";
        live.textContent = "no token";
        await tokenSet();
        continue;
      }
      if (!r.ok) throw new Error(`events: ${r.status}`);
      live.className = "on";
      live.textContent = "live";
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const ev = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (ev.split("\n").some((l) => l.startsWith("data:"))) refresh();
        }
      }
    } catch (e) {
      // fall through to reconnect
    }
    live.className = "off";
    live.textContent = "reconnecting";
    await new Promise((res) => setTimeout(res, 1000));
  }
}

document.getElementById("scope").textContent = org ? `org ${org}` : "whole fleet";
window.addEventListener("hashchange", () => {
  if (takeTokenFromHash()) {
    tokenChanged();
    refresh();
  } else render();
});
// The machine page's output changes without a store change: read it again while it is open.
setInterval(() => {
  if (route().id && !loading) render();
}, 2000);
refresh();
listen();
