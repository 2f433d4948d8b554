// The page on a server with `--auth jwt`, for tests/browser.rs: without a token, and with a
// refused one, it says "token required" with the token input focused and stops reconnecting;
// with a good one it connects. Usage: node token.mjs URL GOOD_TOKEN [SCREENSHOT]. Prints `ok`
// or `fail <why>`.
import { chromium } from "playwright-core";

const [url, good, screenshot] = process.argv.slice(2);
const say = (line) => process.stdout.write(`${line}\n`);
const check = (ok, why) => {
  if (!ok) throw new Error(why);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 860 } });
  page.on("pageerror", (err) => process.stderr.write(`page error: ${err}\n`));
  let sockets = 0;
  page.on("websocket", () => {
    sockets += 1;
  });
  const asks = async (why) => {
    await page.waitForSelector('#connection[data-state="unauthorized"]', { timeout: 20000 });
    check((await page.textContent("#connection")) === "token required", "the indicator says token required");
    check(await page.isVisible("#auth"), "the token notice shows");
    check(await page.evaluate(() => document.activeElement?.id === "token"), "the token input has the focus");
    check((await page.textContent("#auth-why")).includes(why), `the notice says ${why}`);
    // It waits for a token instead of reconnecting.
    const before = sockets;
    await page.waitForTimeout(3000);
    check(sockets === before, `${sockets - before} more connection attempts after asking for a token`);
  };

  await page.goto(url);
  await asks("wants a token");
  // A new token is tried in place, without reloading the page.
  await page.fill("#token", "not-a-token");
  await page.press("#token", "Enter");
  await page.waitForFunction(() => document.getElementById("auth-why").textContent.includes("refused"));
  await asks("refused");
  if (screenshot) await page.screenshot({ path: screenshot });
  await page.fill("#token", good);
  await page.press("#token", "Enter");
  await page.waitForSelector('#connection[data-state="open"]', { timeout: 20000 });
  await page.waitForSelector("#entities input");
  check(await page.isHidden("#auth"), "the token notice goes");
  check(!page.url().includes("token"), `the token stays out of the URL: ${page.url()}`);
  say("ok");
} catch (err) {
  say(`fail ${String(err).replaceAll("\n", " ")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
