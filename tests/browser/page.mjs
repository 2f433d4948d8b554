// Drives the rowcast page in Debian's Chromium for tests/browser.rs, step by step over
// stdin/stdout: the Rust side writes to Postgres and restarts the server, this side watches
// the page. Lines in: `expect <ids>`, `replay <count>`, `screenshot <path>`. Lines out:
// `ready`, `seen`, `replayed`, `done`, or `fail <why>`.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const url = process.argv[2];
const say = (line) => process.stdout.write(`${line}\n`);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value ?? "";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 860 } });
  page.on("pageerror", (err) => process.stderr.write(`page error: ${err}\n`));
  await page.goto(url);
  await page.waitForSelector('#connection[data-state="open"]');
  // Every state the indicator shows, in order.
  await page.evaluate(() => {
    const indicator = document.getElementById("connection");
    window.__states = [indicator.dataset.state];
    new MutationObserver(() => window.__states.push(indicator.dataset.state)).observe(indicator, {
      attributes: true,
      attributeFilter: ["data-state"],
    });
  });
  await page.waitForSelector("#entities input");
  await page.click("#subscribe");
  await page.click("#subscribe");
  await page.waitForFunction(() => document.querySelectorAll("#cards .card").length === 2);
  // Identical filters share one server subscription.
  const shared = await page.evaluate(() => window.rowcast.subscriptions.size);
  if (shared !== 1) throw new Error(`two identical filters made ${shared} subscriptions`);
  say("ready");

  const liveIds = () =>
    page.$$eval("#feed li:not(.replayed)", (items) => items.map((li) => Number(li.dataset.id)));
  const waitFor = async (expected, what) => {
    const want = JSON.stringify([...expected].sort((a, b) => a - b));
    for (let i = 0; i < 300; i++) {
      const ids = await liveIds();
      const got = JSON.stringify([...ids].sort((a, b) => a - b));
      if (got === want) return;
      if (ids.length > expected.length) throw new Error(`${what}: more events than expected: ${got}`);
      await page.waitForTimeout(100);
    }
    throw new Error(`${what}: the feed shows ${JSON.stringify(await liveIds())}, expected ${want}`);
  };

  for (;;) {
    const [command, argument = ""] = (await next()).split(" ");
    if (command === "expect") {
      await waitFor(argument.split(",").map(Number), "live");
      say("seen");
    } else if (command === "states") {
      say(`states ${JSON.stringify(await page.evaluate(() => window.__states))}`);
    } else if (command === "cards") {
      // Both cards of the shared subscription counted every event.
      say(`cards ${await page.$$eval("#cards .count", (c) => c.map((e) => e.textContent).join(","))}`);
    } else if (command === "replay") {
      const count = Number(argument);
      await page.fill("#replay-speed", "100");
      await page.click("#replay-start");
      await page.waitForSelector('#replay-status[data-done="true"]', { timeout: 30000 });
      const replayed = await page.$$eval("#feed li.replayed", (items) => items.length);
      const progress = await page.$eval("#replay-progress", (p) => [p.value, p.max]);
      if (replayed !== count || progress[0] !== progress[1]) {
        throw new Error(`replay showed ${replayed} events (expected ${count}), progress ${progress}`);
      }
      say("replayed");
    } else if (command === "screenshot") {
      await page.click("#feed li.event.error, #feed li.event", { timeout: 2000 }).catch(() => {});
      await page.screenshot({ path: argument });
      say("done");
    } else {
      break;
    }
  }
} catch (err) {
  say(`fail ${String(err).replaceAll("\n", " ")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
