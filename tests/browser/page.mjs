// Drives the rowcast page in Debian's Chromium for tests/browser.rs, step by step over
// stdin/stdout: the Rust side writes to Postgres and restarts the server, this side watches
// the page. Page A is a fresh visit; page B builds a field filter; page C opens B's URL.
// Lines in: `expect <ids>`, `share`, `states`, `cards`, `replay <count>`, `entity <name>`,
// `row <id> <column> <value>`, `norow <id>`, `predicate <entity> <field> <value>`,
// `expect-b <ids>`, `shared`, `expect-c <ids>`, `screenshot <dir>`.
// Lines out: `ready`, `seen`, `shared`, `states ...`, `cards ...`, `replayed`, `entity ready`,
// `row`, `gone`, `built`, `restored`, `done`, or `fail <why>`.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const url = process.argv[2];
const say = (line) => process.stdout.write(`${line}\n`);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value ?? "";
const check = (ok, why) => {
  if (!ok) throw new Error(why);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});

async function open(address) {
  const page = await browser.newPage({ viewport: { width: 1440, height: 860 } });
  page.on("pageerror", (err) => process.stderr.write(`page error: ${err}\n`));
  await page.goto(address);
  await page.waitForSelector('#connection[data-state="open"]');
  return page;
}

// Every server subscription of the page's client is confirmed (so live events reach it).
const confirmed = (page) =>
  page.waitForFunction(() => [...window.rowcast.subscriptions.values()].every((s) => s.serverId && s.lastId !== null));

const feedIds = (page) => page.$$eval("#feed li", (items) => items.map((li) => Number(li.dataset.id)));
async function waitFor(page, expected, what) {
  const want = JSON.stringify([...expected].sort((a, b) => a - b));
  for (let i = 0; i < 300; i++) {
    const ids = await feedIds(page);
    const got = JSON.stringify([...ids].sort((a, b) => a - b));
    if (got === want) return;
    check(ids.length <= expected.length, `${what}: more events than expected: ${got}, expected ${want}`);
    await page.waitForTimeout(100);
  }
  throw new Error(`${what}: the feed shows ${JSON.stringify(await feedIds(page))}, expected ${want}`);
}

// The cells of the entity view's row whose `id` column is `id`, or null.
const entityRow = (page, id) =>
  page.$$eval(
    "#rows tbody tr",
    (rows, id) => {
      const row = rows.find((tr) => tr.querySelector('td[data-col="id"]')?.textContent === id);
      return row ? Object.fromEntries([...row.children].map((td) => [td.dataset.col, td.textContent])) : null;
    },
    id,
  );

try {
  // A fresh visit is live at once: everything the visitor may see, no click.
  const page = await open(url);
  await page.evaluate(() => {
    const indicator = document.getElementById("connection");
    window.__states = [indicator.dataset.state];
    new MutationObserver(() => window.__states.push(indicator.dataset.state)).observe(indicator, {
      attributes: true,
      attributeFilter: ["data-state"],
    });
  });
  const scope = await page.textContent("#notice");
  check(scope.includes("showing all events you may see"), `a fresh visit says what it shows: "${scope}"`);
  check((await page.$$("#cards .card")).length === 1, "a fresh visit has one subscription");
  await confirmed(page);
  say("ready");

  let pageB = null;
  let pageC = null;
  for (;;) {
    const [command, ...rest] = (await next()).split(" ");
    const argument = rest[0] ?? "";
    if (command === "expect") {
      await waitFor(page, argument.split(",").map(Number), "live");
      say("seen");
    } else if (command === "share") {
      // The built "everything" replaces the visit's own; a second identical one shares it.
      await page.waitForSelector("#entities input");
      await page.click("#subscribe");
      await page.click("#subscribe");
      await page.waitForFunction(() => document.querySelectorAll("#cards .card").length === 2);
      const shared = await page.evaluate(() => window.rowcast.subscriptions.size);
      check(shared === 1, `two identical filters made ${shared} subscriptions`);
      check((await page.textContent("#notice")) === "", "the notice goes once the visitor subscribes");
      say("shared");
    } else if (command === "states") {
      say(`states ${JSON.stringify(await page.evaluate(() => window.__states))}`);
    } else if (command === "cards") {
      // Both cards of the shared subscription counted every event.
      say(`cards ${await page.$$eval("#cards .count", (c) => c.map((e) => e.textContent).join(","))}`);
    } else if (command === "replay") {
      const count = Number(argument);
      const live = (await feedIds(page)).length;
      await page.click('[data-tab="replay"]');
      await page.fill("#replay-speed", "100");
      await page.click("#replay-start");
      await page.waitForSelector('#replay-status[data-done="true"]', { timeout: 30000 });
      const replayed = await page.$$eval("#replay-feed li", (items) => items.map((li) => Number(li.dataset.id)));
      const progress = await page.$eval("#replay-progress", (p) => [p.value, p.max]);
      check(
        replayed.length === count && progress[0] === progress[1],
        `replay showed ${replayed.length} events (expected ${count}), progress ${progress}`,
      );
      check(replayed.every((id, i) => i === 0 || replayed[i - 1] < id), `replayed out of order: ${replayed}`);
      check((await feedIds(page)).length === live, "replayed events stay out of the live feed");
      say("replayed");
    } else if (command === "entity") {
      await page.click('[data-tab="entity"]');
      await page.waitForFunction((name) => [...document.querySelectorAll("#entity-view option")].some((o) => o.value === name), argument);
      await page.selectOption("#entity-view", argument);
      await page.waitForSelector('#entity-status[data-ready="true"]');
      await confirmed(page);
      say("entity ready");
    } else if (command === "row") {
      const [id, column, value] = rest;
      let row = null;
      for (let i = 0; i < 300 && row?.[column] !== value; i++) {
        if (i) await page.waitForTimeout(100);
        row = await entityRow(page, id);
      }
      check(row?.[column] === value, `the entity view shows ${id} as ${JSON.stringify(row)}, expected ${column} = ${value}`);
      say("row");
    } else if (command === "norow") {
      let row = {};
      for (let i = 0; i < 300 && row; i++) {
        if (i) await page.waitForTimeout(100);
        row = await entityRow(page, argument);
      }
      check(row === null, `the entity view still shows ${argument}: ${JSON.stringify(row)}`);
      say("gone");
    } else if (command === "predicate") {
      // A fresh visitor builds "<entity> events whose <field> is <value>".
      const [entity, field, value] = rest;
      pageB = await open(url);
      await pageB.waitForSelector("#entities input");
      await pageB.selectOption("#field-entity", entity);
      const control = await pageB.$(`#fields [data-field="${field}"]`);
      if (control && (await control.evaluate((c) => c.classList.contains("values")))) {
        await control.$(`input[value="${value}"]`).then((box) => box.check());
      } else if (control) {
        await control.$("select.op").then((op) => op.selectOption("eq"));
        await control.$("input.value").then((input) => input.fill(value));
      } else {
        await pageB.click("#add-predicate");
        await pageB.fill("#predicates .predicate:last-child .path", field);
        await pageB.fill("#predicates .predicate:last-child .value", value);
      }
      await pageB.click("#subscribe");
      await pageB.waitForFunction(() => document.querySelectorAll("#cards .card").length === 1);
      const spec = await pageB.evaluate(() => window.rowcastPage.builtSpec());
      check(
        JSON.stringify(spec.filter.where) === JSON.stringify([[field, "eq", value]]),
        `the builder made ${JSON.stringify(spec)}`,
      );
      await confirmed(pageB);
      await pageB.click("#clear");
      say("built");
    } else if (command === "expect-b") {
      await waitFor(pageB, argument.split(",").map(Number), "the predicate's feed");
      say("seen");
    } else if (command === "shared") {
      const address = pageB.url();
      check(address.includes("sub=") && !address.includes("token"), `the shared URL: ${address}`);
      pageC = await open(address);
      await pageC.waitForSelector("#entities input");
      const spec = (p) => p.evaluate(() => JSON.stringify(window.rowcastPage.builtSpec()));
      await pageC.waitForFunction((want) => JSON.stringify(window.rowcastPage.builtSpec()) === want, await spec(pageB), {
        timeout: 10000,
      }).catch(async () => {
        throw new Error(`the builder restored ${await spec(pageC)}, expected ${await spec(pageB)}`);
      });
      const keys = (p) => p.evaluate(() => JSON.stringify([...window.rowcast.subscriptions.keys()]));
      check((await keys(pageC)) === (await keys(pageB)), `subscriptions ${await keys(pageC)}, expected ${await keys(pageB)}`);
      const cards = (p) => p.$$eval("#cards .what", (c) => c.map((e) => e.textContent).join("|"));
      check((await cards(pageC)) === (await cards(pageB)), `cards ${await cards(pageC)}, expected ${await cards(pageB)}`);
      await confirmed(pageC);
      say("restored");
    } else if (command === "expect-c") {
      await waitFor(pageC, argument.split(",").map(Number), "the shared view's feed");
      say("seen");
    } else if (command === "screenshot") {
      await page.screenshot({ path: `${argument}/entity.png` });
      await page.click('[data-tab="live"]');
      await page.click("#feed li.event[data-type$='status_changed'], #feed li.event", { timeout: 2000 }).catch(() => {});
      await page.screenshot({ path: `${argument}/page.png` });
      await page.click('[data-tab="replay"]');
      await page.screenshot({ path: `${argument}/replay.png` });
      await pageC?.screenshot({ path: `${argument}/shared.png` });
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
