// The dashboard in headless Chromium against a live dev fleet (started by
// crates/ferry/tests/dashboard.rs): every page loads and shows what the API says, and follows a
// machine that is started, stopped, started again and migrated while the page stays open
// (no reload). Screenshots of each page go to OUT_DIR.
//
// usage: node dashboard.mjs API_URL OUT_DIR ADMIN_TOKEN
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const [api, out, admin] = process.argv.slice(2);
if (!api || !out || !admin) {
  console.error("usage: node dashboard.mjs API_URL OUT_DIR ADMIN_TOKEN");
  process.exit(2);
}
mkdirSync(out, { recursive: true });

// Every wait is bounded; nothing sleeps.
const WAIT = { timeout: 60_000 };

async function call(method, path, body, token = admin) {
  const r = await fetch(api + path, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  if (!r.ok) throw new Error(`${method} ${path} -> ${r.status}: ${text}`);
  return json;
}

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

const browser = await chromium.launch({
  executablePath: process.env.FERRY_CHROMIUM || "/usr/bin/chromium",
  // This machine's network is closed: Chromium's background fetches only make noise.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));
page.on("console", (m) => m.type() === "error" && errors.push(m.text()));

const shot = (name) => page.screenshot({ path: `${out}/${name}.png`, fullPage: true });
const text = (sel) => page.locator(sel).first().innerText();
const waitText = (sel, want) =>
  page.waitForFunction(
    ([s, w]) => {
      const el = document.querySelector(s);
      return el && el.textContent.trim() === w;
    },
    [sel, want],
    WAIT,
  );

try {
  // Without a token the page asks for one and shows nothing of the fleet.
  await page.goto(api + "/ui#/machines");
  await page.waitForSelector("#token-form", WAIT);
  check((await page.locator("tr[data-machine]").count()) === 0, "no rows without a token");
  await shot("token");
  // The browser logs the refused reads as errors; they were the point of this step.
  errors.length = 0;
  // Given once in the address, the token is kept for the tab and dropped from the address.
  await page.goto(api + "/ui#token=" + encodeURIComponent(admin));
  await page.waitForSelector("#live.on", WAIT);
  check(!page.url().includes(admin), "the token left the address bar");

  // Hosts: one row per registered host, with the API's machine counts and one route per other host.
  const hosts = await call("GET", "/v1/hosts");
  await page.goto(api + "/ui#/hosts");
  await page.waitForSelector("#live.on", WAIT);
  await page.waitForFunction((n) => document.querySelectorAll("#hosts tbody tr").length === n, hosts.length, WAIT);
  for (const h of hosts) {
    const row = `tr[data-host="${h.id}"]`;
    check((await text(`${row} .machines`)) === String(h.machines), `host ${h.id} machine count`);
    check((await text(`${row} .route-count`)) === String(hosts.length - 1), `host ${h.id} routes`);
  }
  await shot("hosts");

  // Machines: a machine started now appears, live.
  await page.goto(api + "/ui#/machines");
  await page.waitForSelector("#live.on", WAIT);
  await page.evaluate(() => (window.stillTheSamePage = true));
  await call("POST", "/v1/apps", { app_name: "uiweb" });
  const cmd = ["python3", "-c", "import time\nprint('hello-from-ui', flush=True)\ntime.sleep(1e9)"];
  const m = await call("POST", "/v1/apps/uiweb/machines", { host: hosts[0].id, config: { init: { cmd } } });
  const row = `tr[data-machine="${m.id}"]`;
  await waitText(`${row} .state`, "started");
  check((await text(`${row} .host`)) === hosts[0].id, "machine host");
  check((await text(`${row} .ip`)) === m.private_ip, "machine address");
  check((await text(`${row} .instance`)) === m.instance_id, "machine instance");
  await shot("machines");

  // Stopped and started again: the row follows.
  await call("POST", `/v1/apps/uiweb/machines/${m.id}/stop`, {});
  await waitText(`${row} .state`, "stopped");
  await call("POST", `/v1/apps/uiweb/machines/${m.id}/start`);
  await waitText(`${row} .state`, "started");

  // Migrated: the row shows the new host, address and instance; the migration shows its
  // outcome and downtime; the bridge shows the old address mapped to the new one.
  const mig = await call("POST", `/v1/apps/uiweb/machines/${m.id}/migrate`, { to: hosts[1].id });
  await waitText(`${row} .host`, hosts[1].id);
  const moved = await call("GET", `/v1/apps/uiweb/machines/${m.id}`);
  await waitText(`${row} .ip`, moved.private_ip);
  await waitText(`${row} .instance`, moved.instance_id);
  check(moved.private_ip !== m.private_ip, "a new address");
  check(await page.evaluate(() => window.stillTheSamePage === true), "the page was not reloaded");

  await page.goto(api + "/ui#/migrations");
  const mrow = `tr[data-migration="${mig.id}"]`;
  await waitText(`${mrow} .phase`, "done");
  const done = await call("GET", `/v1/migrations/${mig.id}`);
  check((await text(`${mrow} .outcome`)) === "moved", "migration outcome");
  check((await text(`${mrow} .downtime`)) === `${done.stats.downtime_ms} ms`, "migration downtime");
  await shot("migrations");

  await page.goto(api + "/ui#/bridge");
  const brow = `tr[data-mapping="${m.private_ip}"]`;
  await page.waitForSelector(brow, WAIT);
  check((await text(`${brow} .new`)) === moved.private_ip, "bridge mapping target");
  await shot("bridge");

  // The machine's page: its events and its output.
  await page.goto(api + `/ui#/machines/${m.id}`);
  await page.waitForSelector("#events tbody tr", WAIT);
  const events = await call("GET", `/v1/apps/uiweb/machines/${m.id}/events`);
  const shown = await page.locator("#events tbody tr").count();
  check(shown === events.length, `events shown ${shown}, API has ${events.length}`);
  await page.waitForFunction(() => document.querySelector("#logs")?.textContent.includes("hello-from-ui"), null, WAIT);
  await shot("machine");

  // Another org's view has none of this: not the app, not the machine, not the mapping. As
  // an admin asking for org acme, and as acme's own token (which cannot ask for more).
  const acmeApp = await call("POST", "/v1/apps", { app_name: "uiacme", org_slug: "acme" });
  check(acmeApp.org === "acme", "app in org acme");
  const a = await call("POST", "/v1/apps/uiacme/machines", { host: hosts[0].id, config: { init: { cmd } } });
  await page.goto(api + "/ui?org=acme#/machines");
  await page.waitForSelector(`tr[data-machine="${a.id}"]`, WAIT);
  check((await page.locator(`tr[data-machine="${m.id}"]`).count()) === 0, "org acme sees uiweb's machine");
  const acme = (await call("POST", "/v1/tokens", { kind: "org", org: "acme" })).token;
  const tab = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  tab.on("pageerror", (e) => errors.push(e.message));
  await tab.goto(api + "/ui#token=" + encodeURIComponent(acme));
  await tab.waitForSelector(`tr[data-machine="${a.id}"]`, WAIT);
  check((await tab.locator(`tr[data-machine="${m.id}"]`).count()) === 0, "acme's token sees uiweb's machine");
  await tab.goto(api + "/ui?org=personal#/bridge");
  await tab.waitForSelector("main .empty", WAIT);
  check((await tab.locator("tr[data-mapping]").count()) === 0, "acme's token sees another org's mapping");
  await tab.goto(api + "/ui#/hosts");
  await tab.waitForSelector(`tr[data-host="${hosts[0].id}"]`, WAIT);
  check((await tab.locator(`tr[data-host="${hosts[0].id}"] .machines`).innerText()) === "1", "acme counts only its machine");
  await tab.screenshot({ path: `${out}/org-acme.png`, fullPage: true });
  await tab.close();

  check(errors.length === 0, "no script errors: " + errors.join("; "));
  console.log("dashboard: ok");
} catch (e) {
  console.error(e.stack || String(e));
  await shot("failure").catch(() => {});
  await browser.close();
  process.exit(1);
}
await browser.close();
