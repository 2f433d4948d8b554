// Takes the README's screenshot of a running page (e.g. `rowcast demo`):
//   node tests/browser/screenshot.mjs http://127.0.0.1:8080/ docs/page.png [entity.png]
// The page opens live by itself; the optional second picture is the entity view of agents.
import { chromium } from "playwright-core";

const [url, path, entityPath] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
const page = await browser.newPage({ viewport: { width: 1440, height: 860 } });
await page.goto(url);
await page.waitForSelector('#connection[data-state="open"]');
await page.waitForSelector("#entities input");
await page.waitForTimeout(12000);
const changed = await page.$("#feed li[data-type$='status_changed'], #feed li[data-type$='.updated']");
if (changed) await changed.click();
await page.screenshot({ path });
if (entityPath) {
  await page.click('[data-tab="entity"]');
  await page.selectOption("#entity-view", "agent");
  await page.waitForSelector('#entity-status[data-ready="true"]');
  await page.waitForTimeout(4000);
  await page.screenshot({ path: entityPath });
}
await browser.close();
