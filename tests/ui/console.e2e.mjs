// The operator console in a real headless browser (Debian's chromium,
// driven by playwright-core). Run by tests/it/ui.rs against a live sidecar
// with real promises; see that file for the environment it passes:
//   BASE_URL, TOKEN, PROMISE_ID (pending, to find and cancel), ORPHAN_PROMISE
//   and ORPHAN_RUN (an audit finding: a run by hand for a promise never made), SCREENSHOT,
//   CHROMIUM (the browser), PLAYWRIGHT_MODULES (node_modules with playwright-core).
// Prints one line per step; exits 1 at the first failed expectation.
import { createRequire } from 'node:module';

const env = (k) => {
  const v = process.env[k];
  if (!v) { console.error(`missing ${k}`); process.exit(2); }
  return v;
};
const [base, token, promiseId, orphanPromise, orphanRun, shot, chromiumPath, modules] =
  ['BASE_URL', 'TOKEN', 'PROMISE_ID', 'ORPHAN_PROMISE', 'ORPHAN_RUN', 'SCREENSHOT', 'CHROMIUM',
    'PLAYWRIGHT_MODULES'].map(env);
const require = createRequire(modules.endsWith('/') ? modules : modules + '/');
const { chromium } = require('playwright-core');

let failed = false;
const expect = (ok, what) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failed = true;
  return ok;
};

const browser = await chromium.launch({ executablePath: chromiumPath, headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });

  // Without a token: 401, the login form, no data.
  let r = await page.goto(`${base}/ui`);
  expect(r.status() === 401, `GET /ui without a token answers 401 (got ${r.status()})`);
  expect(await page.locator('#token').count() === 1, 'the login form is shown');
  expect(await page.locator('#count-pending').count() === 0, 'no data is shown');

  // A wrong token is refused.
  await page.fill('#token', 'not-the-token');
  await Promise.all([page.waitForNavigation(), page.press('#token', 'Enter')]);
  expect(await page.locator('[role=alert]').count() === 1, 'a wrong token is refused with a message');

  // Log in with the keyboard.
  await page.fill('#token', token);
  await Promise.all([page.waitForNavigation(), page.press('#token', 'Enter')]);
  expect(new URL(page.url()).pathname === '/ui', `logged in, on the overview (${page.url()})`);
  const pending = Number(await page.textContent('#count-pending'));
  expect(pending >= 1, `the overview counts pending promises (${pending})`);
  expect(await page.locator('figure svg.chart rect').count() === 60, 'the settle-rate chart has 60 minutes');
  const dead = await page.textContent('#dead-letters');
  expect(Number(dead) >= 1, `the overview counts dead letters (${dead})`);
  // The overview refreshes itself (polling a server-rendered fragment).
  const refreshed = await page.waitForSelector('#overview[data-refreshed]', { timeout: 15000 })
    .then(() => true, () => false);
  expect(refreshed, 'the overview refreshed itself');
  expect(await page.locator('#count-pending').count() === 1, 'and still shows the counts');
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot ${shot}`);

  // Every form control has a label; every image has a text alternative.
  const unlabeled = await page.evaluate(() =>
    [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
      .filter((e) => e.labels.length === 0).length);
  expect(unlabeled === 0, `every control on the overview has a label (${unlabeled} without)`);

  // Find the promise by search.
  await page.click('nav >> text=Promises');
  await page.fill('#q-id', promiseId.slice(0, 8) + '*');
  await page.selectOption('#q-state', 'PENDING');
  await Promise.all([page.waitForNavigation(), page.click('form.search button')]);
  const link = page.locator(`#results a`, { hasText: promiseId });
  expect(await link.count() === 1, `the search finds ${promiseId}`);
  const unlabeledSearch = await page.evaluate(() =>
    [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
      .filter((e) => e.labels.length === 0).length);
  expect(unlabeledSearch === 0, 'every control on the search page has a label');

  // Open it; cancel it, confirming with the keyboard.
  await Promise.all([page.waitForNavigation(), link.click()]);
  expect((await page.textContent('#promise-state')).trim() === 'PENDING', 'the promise page shows PENDING');
  expect(await page.locator('#adopt-run').count() === 1, 'a pending promise offers to adopt a run');
  const unlabeledPromise = await page.evaluate(() =>
    [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
      .filter((e) => e.labels.length === 0).length);
  expect(unlabeledPromise === 0, `every control on the promise page has a label (${unlabeledPromise} without)`);
  await page.focus('#cancel-reason');
  await page.keyboard.press('Tab');          // to the confirmation box
  await page.keyboard.press('Space');        // tick it
  await page.keyboard.press('Tab');          // to the button
  await Promise.all([page.waitForNavigation(), page.keyboard.press('Enter')]);
  const state = (await page.textContent('#promise-state')).trim();
  expect(state === 'REJECTED_CANCELED', `after cancelling, the page shows ${state}`);
  expect((await page.textContent('[role=status]')).includes('cancelled'), 'and says it was cancelled');

  // The audit's findings: the orphan, its promise and its run side by side.
  await Promise.all([page.waitForNavigation(), page.click('nav >> text=Audit')]);
  const row = page.locator('tr.finding[data-kind=orphan]', { hasText: orphanPromise });
  expect(await row.count() === 1, `the audit page lists the orphan of ${orphanPromise}`);
  const cells = await row.locator('td').allTextContents();
  expect(cells[2].includes('no such promise') && cells[3].trim() === orphanRun,
    `with the promise side and the run side (${JSON.stringify(cells.slice(0, 6))})`);
  expect(cells[5].trim() === 'cancel', `and what was done (${cells[5]})`);

  // Log out: the console is closed again.
  await Promise.all([page.waitForNavigation(), page.click('header button')]);
  r = await page.goto(`${base}/ui/promises`);
  expect(r.status() === 401, `after logging out, /ui/promises answers 401 (got ${r.status()})`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
