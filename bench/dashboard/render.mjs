// How long the dashboard takes to show a fleet's machines in headless Chromium, against the
// floor of the same run: the page's own fetch and parse of the snapshot it renders.
//
// usage: node render.mjs API_URL MACHINES ROUNDS TOKEN
import { chromium } from "playwright-core";

const [api, machines, rounds, token] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4] || 5), process.argv[5]];
const browser = await chromium.launch({
  executablePath: process.env.FERRY_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const shown = [], fetched = [], rendered = [];
for (let i = 0; i < rounds; i++) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const t0 = Date.now();
  // The token goes in once; the page keeps it for the tab and shows the machines.
  await page.goto(api + "/ui#token=" + encodeURIComponent(token));
  await page.waitForFunction((n) => document.querySelectorAll("#machines tbody tr").length >= n, machines, { timeout: 60_000, polling: "raf" });
  shown.push(Date.now() - t0);
  rendered.push(await page.evaluate(() => window.ferryRenderMs));
  fetched.push(
    await page.evaluate(async () => {
      const t = performance.now();
      const r = await fetch("/v1/dashboard", { headers: { authorization: "Bearer " + sessionStorage.getItem("ferryToken") } });
      await r.json();
      return performance.now() - t;
    }),
  );
  await page.close();
}
await browser.close();
const r = (x) => x.toFixed(1);
console.log(`machines shown: ${machines}`);
console.log(`load to rows shown, ms (median of ${rounds}): ${r(median(shown))}   [${shown.map(r).join(", ")}]`);
console.log(`  of which rendering (innerHTML of the table), ms: ${r(median(rendered))}`);
console.log(`baseline: the page's fetch + JSON parse of the snapshot, ms: ${r(median(fetched))}`);
console.log(`ratio shown/baseline: ${r(median(shown) / median(fetched))}; goal: shown < 1000 ms`);
