// Browser tests of the admin UI: headless Chromium (Debian's package) driven by playwright-core,
// against a real control plane and Postgres with an agent (see harness.mjs). Screenshots of
// every page go to target/webui-artifacts/ (KVFLEET_WEBUI_ARTIFACTS overrides).
//
// Run: DATABASE_URL=postgres://... node --test web-ui/tests/   (scripts/test.sh does this)

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { ThrowawayDb, ControlPlane, SimAgent, waitFor, artifacts, findChromium, findPsql, controlPlaneBin } from './harness.mjs';

function skipReason() {
  if (!process.env.DATABASE_URL) return 'DATABASE_URL is not set (scripts/test.sh starts a test Postgres)';
  if (!findChromium()) return 'no Chromium at /usr/bin/chromium (apt-get install chromium)';
  if (!findPsql()) return 'psql not found';
  if (!fs.existsSync(controlPlaneBin())) return `no control-plane binary at ${controlPlaneBin()} (cargo build -p kvfleet-controlplane)`;
  return null;
}
const skip = skipReason();
if (skip && process.env.KVFLEET_WEBUI_REQUIRE === '1') {
  throw new Error(`the web UI browser tests cannot run: ${skip}`);
}
if (skip) console.log(`# skipping the web UI browser tests: ${skip}`);

describe('admin web UI', { skip: skip || false }, () => {
  let db; let cp; let agent; let browser; let context; let page;
  let viewerToken;
  const pageErrors = [];

  const shot = async (name, p = page) => {
    await p.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
  };
  const text = async (selector, p = page) => (await p.locator(selector).first().textContent()) || '';
  const waitText = (selector, re, what, p = page, timeout = 20_000) =>
    waitFor(async () => re.test(await text(selector, p).catch(() => '')), { what: what || `${selector} ~ ${re}`, timeout });
  // Every form control has a label a screen reader announces.
  const unlabelled = (p = page) => p.evaluate(() => [...document.querySelectorAll('input, select, textarea')]
    .filter((el) => !(el.labels?.length || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')))
    .map((el) => el.outerHTML));
  const goNav = async (label) => {
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: label, exact: true }).click();
    await page.getByRole('heading', { level: 1 }).first().waitFor();
    assert.deepEqual(await unlabelled(), [], `${label}: unlabelled controls`);
  };

  before(async () => {
    fs.mkdirSync(artifacts, { recursive: true });
    db = new ThrowawayDb(process.env.DATABASE_URL);
    db.create();
    cp = await new ControlPlane(db.url).start();
    const join = await cp.token('join', 'webui-join');
    agent = await new SimAgent(cp, join, { hostname: 'gpu-node-1', gpus: 2 }).register();
    // Joins wait for an admin here, as in production; this one is let in through the API (the
    // Approve and Reject buttons have their own test below).
    await cp.api('POST', `/nodes/${agent.nodeId}/approve`);
    agent.run();
    browser = await chromium.launch({
      executablePath: findChromium(),
      headless: true,
      // Chromium refuses its sandbox as root (CI runs as root).
      args: process.getuid?.() === 0 ? ['--no-sandbox'] : [],
    });
    context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    page = await context.newPage();
    page.setDefaultTimeout(15_000);
    page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error' && !/status of 4\d\d/.test(m.text())) pageErrors.push(`console: ${m.text()}`); });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await agent?.stop().catch(() => {});
    await cp?.stop().catch(() => {});
    db?.drop();
  });

  it('serves the app shell under /ui/ with module scripts and an SPA fallback', async () => {
    for (const [p, type] of [['/ui/', 'text/html'], ['/ui/deployments', 'text/html'], ['/ui/js/app.js', 'text/javascript'], ['/ui/style.css', 'text/css']]) {
      const r = await fetch(cp.base + p);
      assert.equal(r.status, 200, p);
      assert.match(r.headers.get('content-type'), new RegExp(type), p);
    }
    assert.equal((await fetch(`${cp.base}/ui/js/missing.js`)).status, 404);
  });

  it('refuses a bad token at the token field', async () => {
    await page.goto(`${cp.base}/ui/`);
    await page.getByLabel('API token', { exact: true }).fill('kvf_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await waitText('#f-token-error', /not valid/, 'the token error');
    assert.equal(await page.getByLabel('API token', { exact: true }).getAttribute('aria-invalid'), 'true');
    await shot('00-signin-error');
  });

  it('signs in with the keyboard and shows the node, its GPUs and its state', async () => {
    await page.getByLabel('API token', { exact: true }).fill('');
    await page.getByLabel('API token', { exact: true }).focus();
    await page.keyboard.type(cp.adminToken);
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Fleet overview' }).waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('kvfleet.token')), cp.adminToken);
    await waitText('tr[data-node="gpu-node-1"] [data-col="state"]', /healthy/, 'the node to show as healthy');
    await waitFor(async () => (await page.locator('section[aria-labelledby="h-gpus"] tbody tr').count()) === 2, { what: 'two GPU rows' });
    assert.match(await text('section[aria-labelledby="h-gpus"] tbody'), /H100/);
    // The admin sees every page in the navigation.
    for (const label of ['Overview', 'Deployments', 'Models', 'KV cache', 'Decisions', 'Audit log', 'Tokens']) {
      assert.equal(await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: label, exact: true }).count(), 1, label);
    }
  });

  it('adds a model', async () => {
    await goNav('Models');
    await page.getByLabel('Name', { exact: true }).fill('tiny-mock');
    await page.getByLabel('Format', { exact: true }).selectOption('mock');
    await page.getByLabel('Path on every node', { exact: true }).fill('/var/lib/kvfleet/models/tiny');
    await page.getByRole('button', { name: 'Add model' }).click();
    await page.locator('tr[data-model="tiny-mock"]').waitFor();
    await shot('03-models');
  });

  it('shows validation errors from the API at the fields they name', async () => {
    await goNav('Deployments');
    await page.getByLabel('Name', { exact: true }).fill('Bad_Name');
    await page.getByLabel('Min workers', { exact: true }).fill('3');
    await page.getByLabel('Max workers', { exact: true }).fill('1');
    await page.getByLabel('TTFT target (ms)', { exact: true }).fill('-5');
    await page.getByLabel('Prefill timeout (ms)', { exact: true }).fill('50');
    await page.getByLabel('Migration limit', { exact: true }).fill('21');
    await page.getByRole('button', { name: 'Create deployment' }).click();
    await waitText('#f-min-workers-error', /must not exceed max_workers/, 'the min_workers error');
    assert.match(await text('#f-migration-limit-error'), /between 0 and 20, not 21/);
    assert.match(await text('#f-name-error'), /must match/);
    assert.match(await text('#f-sla-ttft-ms-error'), /above 0/);
    assert.match(await text('#f-disaggregation-prefill-timeout-ms-error'), /from 100 to 600000/);
    for (const label of ['Name', 'Min workers', 'TTFT target (ms)']) {
      assert.equal(await page.getByLabel(label, { exact: true }).getAttribute('aria-invalid'), 'true', label);
    }
    assert.equal(await page.getByLabel('Max workers', { exact: true }).getAttribute('aria-invalid'), null);
    // The first bad field has the focus, so a keyboard user lands on it.
    assert.equal(await page.evaluate(() => document.activeElement?.name), 'name');
    assert.equal(await page.locator('tr[data-deployment]').count(), 0, 'nothing was created');
    await shot('04-deployment-validation');
  });

  it('creates a deployment and its workers become ready', async () => {
    await page.getByLabel('Name', { exact: true }).fill('chat');
    await page.getByLabel('Model', { exact: true }).selectOption('tiny-mock');
    await page.getByLabel('Min workers', { exact: true }).fill('2');
    await page.getByLabel('Max workers', { exact: true }).fill('3');
    await page.getByLabel('TTFT target (ms)', { exact: true }).fill('500');
    await page.getByLabel('ITL target (ms)', { exact: true }).fill('50');
    await page.getByLabel('Prefill timeout (ms)', { exact: true }).fill('2000');
    await page.getByLabel('Migration limit', { exact: true }).fill('');
    await page.getByRole('button', { name: 'Create deployment' }).click();
    await page.locator('tr[data-deployment="chat"]').waitFor();
    // Left empty: the server's default.
    assert.equal(await text('tr[data-deployment="chat"] [data-col="migration"]'), '3');
    assert.equal(await page.locator('.field-error:not([hidden])').count(), 0);
    // Placement puts two workers on the node; the agent starts them; the page updates itself.
    await waitText('tr[data-deployment="chat"] [data-col="workers"]', /^2\/2 ready$/, 'two ready workers', page, 30_000);
    await shot('05-deployments');
    await goNav('Overview');
    await waitFor(async () => (await page.locator('tr[data-worker][data-state="ready"]').count()) === 2, { what: 'two ready worker rows on the overview' });
    await waitText('[data-tile="rps"] .value', /^\d+\.\d\d$/, 'a request rate on the overview', page, 20_000);
    await waitFor(async () => (await page.locator('svg.chart path.line').count()) > 0, { what: 'a fleet chart', timeout: 20_000 });
    await shot('01-overview');
  });

  it('edits a deployment', async () => {
    await goNav('Deployments');
    await page.getByRole('button', { name: 'Edit chat' }).click();
    assert.equal(await page.getByLabel('Name', { exact: true }).isDisabled(), true);
    assert.equal(await page.getByLabel('Migration limit', { exact: true }).inputValue(), '3');
    await page.getByLabel('Max workers', { exact: true }).fill('4');
    await page.getByLabel('Migration limit', { exact: true }).fill('5');
    assert.equal(await page.getByLabel('Tool-call parser', { exact: true }).inputValue(), 'auto');
    await page.getByLabel('Tool-call parser', { exact: true }).selectOption('pythonic');
    await page.getByRole('button', { name: 'Save changes' }).click();
    await waitText('tr[data-deployment="chat"] [data-col="range"]', /^2–4$/, 'the new range');
    await waitText('tr[data-deployment="chat"] [data-col="migration"]', /^5$/, 'the new migration limit');
    const chat = (await cp.api('GET', '/deployments')).items.find((d) => d.name === 'chat');
    assert.equal(chat.migration_limit, 5, 'saved through the API');
    assert.equal(chat.tool_parser, 'pythonic', 'saved through the API');
    assert.equal(chat.reasoning_parser, 'auto', 'left as it was');
  });

  it('shows a deployment with charts and placement decisions', async () => {
    await page.locator('tr[data-deployment="chat"] a').first().click();
    await page.getByRole('heading', { name: 'Deployment chat' }).waitFor();
    // The policy set in the form, with the defaults for the fields left empty.
    assert.match(await text('dl.kv'), /remote prefill from 256 uncached tokens, prefill queue ≤ 16384 tokens, timeout 2000 ms \(unused while aggregated\)/);
    assert.match(await text('dd[data-migration-limit="5"]'), /moves to another worker at most 5 times/);
    assert.equal(await text('dd[data-output-parsers]'), 'tool calls: pythonic, reasoning: auto');
    await waitFor(async () => (await page.locator('svg.chart path.line').count()) >= 3, { what: 'deployment charts', timeout: 20_000 });
    await page.locator('li[data-action="worker.create"]').first().waitFor();
    await shot('06-deployment-detail');
  });

  it("shows the SLA planner's decisions and charts on a deployment", async () => {
    // Still on chat's page. `advise` makes the leader's planner record a decision every round
    // (1 s here) without changing the fleet, so the later tests see the same workers.
    const chat = (await cp.api('GET', '/deployments')).items.find((d) => d.name === 'chat');
    await cp.api('PATCH', `/deployments/${chat.id}`, { planner: 'advise' });
    const section = 'section[aria-labelledby="h-planner"]';
    await page.locator(`${section} ol.planner-timeline li[data-action]`).first().waitFor({ timeout: 30_000 });
    const entry = `${section} ol.planner-timeline li[data-action]`;
    assert.ok((await text(`${entry} .reason`)).trim().length > 10, 'a decision says why');
    assert.match(await text(`${entry} .inputs`), /observed \d+(\.\d+)? req\/s/);
    assert.match(await text(`${entry} .outcome`), /→ \d+ aggregated/);
    assert.match(await text(`${section} .planner-now`), /\(advise\)/);
    const titles = await page.locator(`${section} .planner-charts`).innerText();
    for (const title of ['TTFT p90 vs target', 'ITL p90 vs target', 'Workers per role', 'Load']) {
      assert.ok(titles.includes(title), `the ${title} chart`);
    }
    // The same decisions through the API, the page's source.
    const decisions = await cp.api('GET', `/planner/decisions?deployment=${chat.id}`);
    assert.ok(decisions.items.length > 0 && decisions.items.every((d) => d.mode === 'advise' && !d.applied));
    await shot('06b-deployment-planner');
    await cp.api('PATCH', `/deployments/${chat.id}`, { planner: 'off' });
  });

  it('cordons and uncordons a node from its page', async () => {
    await goNav('Overview');
    await page.locator('tr[data-node="gpu-node-1"] a').click();
    await page.getByRole('heading', { name: /gpu-node-1/ }).waitFor();
    await page.getByRole('button', { name: 'Cordon', exact: true }).click();
    await waitText('h1', /cordoned/, 'the cordoned badge');
    await page.getByRole('button', { name: 'Uncordon' }).waitFor();
    await shot('02-node-cordoned');
    await page.getByRole('button', { name: 'Uncordon' }).click();
    await waitFor(async () => !/cordoned/.test(await text('h1')), { what: 'the badge to go' });
    await page.getByRole('button', { name: 'Cordon', exact: true }).waitFor();
    const audit = await cp.api('GET', '/audit?action=node.cordon');
    assert.equal(audit.items.length, 1, 'one cordon, audited');
  });

  it('charts KV cache usage and hit rate per worker', async () => {
    await goNav('KV cache');
    await waitFor(async () => (await page.locator('section[aria-labelledby="h-kv-now"] tbody tr').count()) === 2, { what: 'two KV rows' });
    await waitFor(async () => (await page.locator('svg.chart path.line').count()) >= 4, { what: 'usage and hit-rate lines for both workers', timeout: 20_000 });
    assert.match(await text('section[aria-labelledby="h-kv-now"] tbody'), /\d+ \/ 4096/);
    // Blocks per tier from the fleet KV index: each simulated worker announced 3 / 2 / 1.
    await waitFor(async () => (await page.locator('section[aria-labelledby="h-kv-now"] td[data-col="g3"]').allInnerTexts()).join(',') === '1,1',
      { what: 'G3 blocks of both workers', timeout: 20_000 });
    for (const [col, n] of [['g1', '3'], ['g2', '2'], ['g3', '1']]) {
      assert.deepEqual(await page.locator(`section[aria-labelledby="h-kv-now"] td[data-col="${col}"]`).allInnerTexts(), [n, n], col);
    }
    // Fleet totals (workers stopped by earlier tests leave the index at its next sweep).
    const tiles = async () => [await text('[data-tile="kv-g1"]'), await text('[data-tile="kv-g2"]'), await text('[data-tile="kv-g3"]')];
    await waitFor(async () => (await tiles()).join('|') === 'G1 blocks (device)6|G2 blocks (host memory)4|G3 blocks (local disk)2',
      { what: 'per-tier totals 6 / 4 / 2', timeout: 20_000 });
    // Over time: with a 5-minute window (5 s buckets) each worker's usage becomes a line.
    await page.getByLabel('Window', { exact: true }).selectOption('5');
    await waitFor(async () => (await page.locator('svg.chart path.line').evaluateAll((ps) => ps.filter((p) => p.getAttribute('d').includes('L')).length)) >= 2,
      { what: 'lines (two or more buckets) in the KV charts', timeout: 30_000 });
    await shot('07-kv-cache');
  });

  it("shows a failed worker's engine and the reason its agent gave", async () => {
    const [id] = [...agent.workers].find(([, w]) => w.desired === 'running');
    const reason = 'llamacpp: cannot start /nonexistent/llama-server: No such file or directory (os error 2)';
    agent.failures.set(id, { engine: 'llamacpp b6123', error: reason });
    const row = `tr[data-worker="${id}"]`;
    try {
      await goNav('Overview');
      await waitText(`${row} [data-error]`, /cannot start \/nonexistent\/llama-server/, "the failed worker's reason");
      assert.equal(await page.locator(`${row}[data-state="failed"]`).count(), 1);
      assert.equal(await text(`${row} [data-col="Engine"]`), 'llamacpp b6123');
      // The whole reason is the cell's tooltip too.
      assert.equal(await page.locator(`${row} [data-error]`).getAttribute('title'), reason);
      await shot('16-worker-failed');
    } finally {
      agent.failures.delete(id);
    }
    // Recovered: the reason goes with the failure.
    await waitFor(async () => (await page.locator(`${row} [data-error]`).count()) === 0, { what: 'the reason to go' });
  });

  it('lists placement decisions with their reasons', async () => {
    await goNav('Decisions');
    await page.locator('li[data-action="worker.create"]').first().waitFor();
    assert.match(await text('li[data-action="worker.create"] .reason'), /fewer aggregated workers than the deployment's target/);
    await shot('08-decisions');
  });

  it('shows the audit log to an admin', async () => {
    await goNav('Audit log');
    await page.locator('tr[data-action="deployment.create"]').waitFor();
    assert.match(await text('tr[data-action="deployment.create"]'), /bootstrap/);
    await shot('09-audit');
  });

  it('creates a viewer token and shows its secret once', async () => {
    await goNav('Tokens');
    await page.getByLabel('Name', { exact: true }).fill('webui-viewer');
    await page.getByLabel('Role', { exact: true }).selectOption('viewer');
    await page.getByRole('button', { name: 'Create token' }).click();
    viewerToken = (await page.locator('[data-secret]').textContent()).trim();
    assert.match(viewerToken, /^kvf_[a-z0-9]{12}_/);
    await page.locator('tr[data-token="webui-viewer"]').waitFor();
    await shot('10-tokens');
  });

  it('lets a viewer see everything and change nothing', async () => {
    const vctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const v = await vctx.newPage();
    v.setDefaultTimeout(15_000);
    const writes = [];
    v.on('request', (r) => { if (r.url().includes('/api/v1/') && r.method() !== 'GET') writes.push(`${r.method()} ${r.url()}`); });
    v.on('pageerror', (e) => pageErrors.push(`viewer pageerror: ${e.message}`));
    await v.goto(`${cp.base}/ui/`);
    await v.getByLabel('API token', { exact: true }).fill(viewerToken);
    await v.getByRole('button', { name: 'Sign in' }).click();
    await v.getByRole('heading', { name: 'Fleet overview' }).waitFor();
    await waitText('[data-role]', /viewer/, 'the viewer role', v);
    const navLinks = await v.getByRole('navigation', { name: 'Main' }).getByRole('link').allTextContents();
    assert.deepEqual(navLinks, ['Overview', 'Deployments', 'Models', 'KV cache', 'Decisions']);
    await v.locator('tr[data-node="gpu-node-1"]').waitFor();
    const offered = async () => (await v.locator('main button:visible, main form:visible').allTextContents())
      .filter((t) => !/^Show older$/.test(t.trim()));
    await shot('11-viewer-overview', v);
    for (const [route, ready] of [
      ['nodes/' + agent.nodeId, 'h1'],
      ['deployments', 'tr[data-deployment="chat"]'],
      ['models', 'tr[data-model="tiny-mock"]'],
      ['kv', 'section[aria-labelledby="h-kv-now"] tbody tr'],
      ['decisions', 'li[data-action]'],
    ]) {
      await v.goto(`${cp.base}/ui/${route}`);
      await v.locator(ready).first().waitFor();
      await v.waitForTimeout(300);
      assert.deepEqual(await offered(), [], `${route} offers a viewer no buttons or forms`);
      await shot(`12-viewer-${route.split('/')[0]}`, v);
    }
    await v.goto(`${cp.base}/ui/tokens`);
    await v.getByRole('heading', { name: 'Not allowed' }).waitFor();
    await shot('13-viewer-tokens-denied', v);
    assert.deepEqual(writes, [], 'the viewer session sent no write request');
    // And the server agrees: the same token cannot write even if a request is crafted.
    const status = await v.evaluate(async (token) => (await fetch('/api/v1/nodes', { headers: { Authorization: `Bearer ${token}` } })).status
      * 1000 + (await fetch('/api/v1/deployments/chat', { method: 'DELETE', headers: { Authorization: `Bearer ${token}` } })).status, viewerToken);
    assert.equal(status, 200 * 1000 + 403);
    await vctx.close();
  });

  it('ends a session whose token an admin revokes', async () => {
    const token = await cp.token('operator', 'webui-revoked');
    const octx = await browser.newContext();
    const o = await octx.newPage();
    await o.goto(`${cp.base}/ui/`);
    await o.getByLabel('API token', { exact: true }).fill(token);
    await o.getByRole('button', { name: 'Sign in' }).click();
    await o.locator('tr[data-node="gpu-node-1"]').waitFor();
    await goNav('Tokens');
    page.once('dialog', (d) => d.accept());
    await page.getByRole('button', { name: 'Revoke token webui-revoked' }).click();
    await waitText('tr[data-token="webui-revoked"] [data-col="status"]', /revoked/, 'the revoked badge');
    // The operator's next poll gets 401: back to sign-in, saying why, token forgotten.
    await o.getByRole('heading', { name: 'Sign in to kvfleet' }).waitFor({ timeout: 10_000 });
    assert.match(await text('.form-error', o), /session ended/);
    assert.equal(await o.evaluate(() => sessionStorage.getItem('kvfleet.token')), null);
    await octx.close();
  });

  it('is usable on a narrow screen', async () => {
    const narrow = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
    const n = await narrow.newPage();
    await n.goto(`${cp.base}/ui/`);
    await n.getByLabel('API token', { exact: true }).fill(cp.adminToken);
    await n.getByRole('button', { name: 'Sign in' }).click();
    await n.locator('tr[data-node="gpu-node-1"]').waitFor();
    // The page itself does not scroll sideways (wide tables scroll inside their own box).
    const overflow = await n.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `page overflows by ${overflow}px`);
    await shot('14-overview-narrow', n);
    await narrow.close();
  });

  it('drains a node and its page shows why its workers move', async () => {
    await goNav('Overview');
    await page.locator('tr[data-node="gpu-node-1"] a').click();
    await page.getByRole('button', { name: 'Drain', exact: true }).click();
    await waitText('h1', /draining/, 'the draining badge');
    // Placement reacts within its interval; the node page's timeline updates by itself.
    await waitFor(async () => /node draining/.test(await text('li[data-action="worker.drain"], li[data-action="worker.stop"]')),
      { what: 'a drain decision with its reason on the node page', timeout: 20_000 });
    await shot('02-node-draining');
    await page.getByRole('button', { name: 'Stop draining (uncordon)' }).click();
    await waitFor(async () => !/draining|cordoned/.test(await text('h1')), { what: 'the node to take work again' });
  });

  it('deletes a deployment and its workers stop', async () => {
    await goNav('Deployments');
    page.once('dialog', (d) => d.accept());
    await page.getByRole('button', { name: 'Delete chat' }).click();
    await waitFor(async () => (await page.locator('tr[data-deployment="chat"]').count()) === 0, { what: 'the row to go' });
    await waitFor(async () => (await cp.api('GET', '/workers')).items.length === 0, { what: 'no live workers' });
  });

  it('approves and rejects pending joins from the node page', async () => {
    const join = (await cp.api('POST', '/tokens', { name: 'webui-pending', role: 'join', uses: 2 })).secret;
    // No GPUs and no CPU slots: nothing is placed on them, so the other tests' counts hold.
    const newcomer = await new SimAgent(cp, join, { hostname: 'new-node', gpus: 0, cpuSlots: 0 }).register();
    const stranger = await new SimAgent(cp, join, { hostname: 'stranger', gpus: 0, cpuSlots: 0 }).register();
    await goNav('Overview');
    await waitText('tr[data-node="new-node"] [data-col="state"]', /pending approval/, 'the pending badge in the table');
    assert.doesNotMatch(await text('tr[data-node="gpu-node-1"] [data-col="state"]'), /pending/);
    await page.locator('tr[data-node="new-node"] a').click();
    await page.getByRole('heading', { name: /new-node/ }).waitFor();
    assert.match(await text('h1'), /pending approval/);
    // A pending node offers the decision, not cordon or remove.
    assert.equal(await page.getByRole('button', { name: 'Cordon', exact: true }).count(), 0);
    await shot('15-node-pending');
    await page.getByRole('button', { name: 'Approve', exact: true }).click();
    await waitFor(async () => !/pending/.test(await text('h1')), { what: 'the pending badge to go' });
    await page.getByRole('button', { name: 'Cordon', exact: true }).waitFor();
    assert.equal((await cp.api('GET', `/nodes/${newcomer.nodeId}`)).approval, 'approved');
    await page.goto(`${cp.base}/ui/nodes/${stranger.nodeId}`);
    await page.getByRole('heading', { name: /stranger/ }).waitFor();
    page.once('dialog', (d) => d.accept());
    await page.getByRole('button', { name: 'Reject', exact: true }).click();
    await waitText('h1', /rejected/, 'the rejected badge');
    const rejected = await cp.api('GET', `/nodes/${stranger.nodeId}`);
    assert.equal(rejected.approval, 'rejected');
    assert.equal(rejected.state, 'removed');
    // Its credential is dead: the agent's next call is refused.
    const beat = await fetch(`${cp.base}/api/v1/agent/heartbeat`, {
      method: 'POST', headers: { Authorization: `Bearer ${stranger.credential}`, 'Content-Type': 'application/json' }, body: '{}' });
    assert.equal(beat.status, 401);
    // Each decision is audited against its node (gpu-node-1's approval, through the API, too).
    for (const [action, node] of [['node.approve', newcomer], ['node.reject', stranger]]) {
      const rows = (await cp.api('GET', `/audit?action=${action}`)).items;
      assert.equal(rows.filter((r) => r.target_id === node.nodeId).length, 1, action);
    }
  });

  it('raised no script errors', () => {
    assert.deepEqual(pageErrors, []);
    assert.equal(agent.lastError, undefined, `agent: ${agent.lastError?.message}`);
    assert.ok(agent.beats > 5);
  });
});
