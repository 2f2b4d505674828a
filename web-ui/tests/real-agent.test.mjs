// The acceptance path with the real node agent: kvfleet-agent joins the control plane with a
// join token made in the UI's API, and the browser watches it appear, runs a deployment on it
// (mock-engine workers in CPU slots: this machine has no GPU) until its workers are ready, and
// checks that a viewer cannot change anything. The page-by-page coverage with GPUs is in
// webui.test.mjs (simulated agent). Screenshots: target/webui-artifacts/real-agent-*.png.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { ThrowawayDb, ControlPlane, RealAgent, waitFor, artifacts, findChromium, findPsql, controlPlaneBin } from './harness.mjs';

async function skipReason() {
  if (!process.env.DATABASE_URL) return 'DATABASE_URL is not set (scripts/test.sh starts a test Postgres)';
  if (!findChromium()) return 'no Chromium at /usr/bin/chromium (apt-get install chromium)';
  if (!findPsql()) return 'psql not found';
  if (!fs.existsSync(controlPlaneBin())) return `no control-plane binary at ${controlPlaneBin()}`;
  return new RealAgent({ base: 'http://127.0.0.1:9' }, 'kvf_000000000000_0000000000000000000000000000000000000000000').unsupported();
}
const skip = await skipReason();
if (skip && process.env.KVFLEET_WEBUI_REQUIRE === '1' && !/control-plane client/.test(skip)) {
  throw new Error(`the web UI browser tests cannot run: ${skip}`);
}
if (skip) console.log(`# skipping the real-agent browser test: ${skip}`);

describe('admin web UI with the real kvfleet-agent', { skip: skip || false }, () => {
  let db; let cp; let agent; let browser; let page;
  const pageErrors = [];
  const shot = (name, p = page) => p.screenshot({ path: path.join(artifacts, `real-agent-${name}.png`), fullPage: true });
  const text = async (selector, p = page) => (await p.locator(selector).first().textContent().catch(() => '')) || '';

  before(async () => {
    fs.mkdirSync(artifacts, { recursive: true });
    db = new ThrowawayDb(process.env.DATABASE_URL);
    db.create();
    // A lab: the agent is admitted as it joins (the approval buttons are webui.test.mjs's).
    cp = await new ControlPlane(db.url, { autoApprove: true }).start();
    agent = await new RealAgent(cp, await cp.token('join', 'real-agent-join'), { hostname: 'cpu-node-1', cpuSlots: 2 }).start();
    browser = await chromium.launch({ executablePath: findChromium(), headless: true, args: process.getuid?.() === 0 ? ['--no-sandbox'] : [] });
    page = await (await browser.newContext({ viewport: { width: 1440, height: 900 } })).newPage();
    page.setDefaultTimeout(15_000);
    page.on('pageerror', (e) => pageErrors.push(e.message));
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await agent?.stop().catch(() => {});
    await cp?.stop().catch(() => {});
    db?.drop();
  });

  it('signs in and sees the agent\'s node appear', async () => {
    await page.goto(`${cp.base}/ui/`);
    await page.getByLabel('API token', { exact: true }).fill(cp.adminToken);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('heading', { name: 'Fleet overview' }).waitFor();
    await waitFor(async () => /healthy/.test(await text('tr[data-node="cpu-node-1"] [data-col="state"]')), { what: 'the real agent\'s node to be healthy', timeout: 30_000 });
    assert.match(await text('tr[data-node="cpu-node-1"] [data-col="agent"]'), /\d+\.\d+/, 'the agent reports its version');
  });

  it('creates a deployment in the UI and the agent makes its workers ready', async () => {
    await cp.api('POST', '/models', { name: 'tiny-mock', format: 'mock', path: '/unused' });
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Deployments', exact: true }).click();
    await page.getByLabel('Name', { exact: true }).fill('chat');
    await waitFor(async () => (await page.getByLabel('Model', { exact: true }).locator('option').allTextContents()).includes('tiny-mock'), { what: 'the model in the list' });
    await page.getByLabel('Model', { exact: true }).selectOption('tiny-mock');
    await page.getByLabel('Min workers', { exact: true }).fill('2');
    await page.getByLabel('Max workers', { exact: true }).fill('2');
    await page.getByLabel('May run on CPU slots', { exact: true }).check();
    await page.getByRole('button', { name: 'Create deployment' }).click();
    await page.locator('tr[data-deployment="chat"]').waitFor();
    await waitFor(async () => /^2\/2 ready$/.test(await text('tr[data-deployment="chat"] [data-col="workers"]')), { what: 'two ready workers on the real agent', timeout: 60_000 });
    await shot('deployments');
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Overview', exact: true }).click();
    await waitFor(async () => (await page.locator('tr[data-worker][data-state="ready"]').count()) === 2, { what: 'ready worker rows' });
  });

  it('shows the traffic the agent serves as requests per second', async () => {
    // Chat completions through the agent's OpenAI frontend, a few a second (bounded: 30 s at
    // most, loopback only), until the overview shows the rate its heartbeats report.
    let sending = true;
    let served = 0;
    const traffic = (async () => {
      const until = Date.now() + 30_000;
      while (sending && Date.now() < until) {
        const r = await fetch(`http://127.0.0.1:${agent.port}/v1/chat/completions`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ model: 'tiny-mock', messages: [{ role: 'user', content: `hello ${served}` }], max_tokens: 8 }),
        });
        if (r.ok) served += 1;
        await r.arrayBuffer();
        await new Promise((res) => setTimeout(res, 100));
      }
    })();
    try {
      await waitFor(async () => Number(await text('[data-tile="rps"] .value')) > 0, { what: 'a non-zero request rate on the overview', timeout: 25_000 });
    } finally {
      sending = false;
      await traffic;
    }
    assert.ok(served > 0);
    await shot('overview');
  });

  it('shows a validation error at the field', async () => {
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Deployments', exact: true }).click();
    await page.getByRole('button', { name: 'Edit chat' }).click();
    await page.getByLabel('Min workers', { exact: true }).fill('5');
    await page.getByRole('button', { name: 'Save changes' }).click();
    await waitFor(async () => /must not exceed max_workers/.test(await text('#f-min-workers-error')), { what: 'the field error' });
    assert.equal(await page.getByLabel('Min workers', { exact: true }).getAttribute('aria-invalid'), 'true');
  });

  it('gives a viewer nothing to change', async () => {
    const viewer = await cp.token('viewer', 'real-agent-viewer');
    const ctx = await browser.newContext();
    const v = await ctx.newPage();
    const writes = [];
    v.on('request', (r) => { if (r.url().includes('/api/v1/') && r.method() !== 'GET') writes.push(r.url()); });
    await v.goto(`${cp.base}/ui/deployments`);
    await v.getByLabel('API token', { exact: true }).fill(viewer);
    await v.getByRole('button', { name: 'Sign in' }).click();
    await v.locator('tr[data-deployment="chat"]').waitFor();
    assert.equal(await v.locator('main button:visible, main form:visible').count(), 0);
    await v.goto(`${cp.base}/ui/nodes/${agent.nodeId}`);
    await v.getByRole('heading', { name: /cpu-node-1/ }).waitFor();
    assert.equal(await v.locator('main button:visible').count(), 0);
    await shot('viewer-node', v);
    assert.deepEqual(writes, []);
    await ctx.close();
    assert.deepEqual(pageErrors, []);
  });
});
