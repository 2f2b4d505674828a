// What the browser tests run against: a real kvfleet-controlplane binary over a throwaway
// Postgres database, and an agent: either the real kvfleet-agent binary joined with a join
// token (RealAgent: CPU slots only on a machine without GPUs, mock-engine workers), or
// SimAgent, which speaks the documented agent protocol itself (register with a join token,
// heartbeats reporting the desired workers as starting, then ready, with serving and KV
// metrics) and reports two fake H100s, so the GPU views have something to show.

import { spawn, execFileSync, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const artifacts = process.env.KVFLEET_WEBUI_ARTIFACTS || path.join(repoRoot, 'target/webui-artifacts');

export function findPsql() {
  const candidates = [
    ...(process.env.PATH || '').split(':').map((d) => path.join(d, 'psql')),
    ...(fs.existsSync('/usr/lib/postgresql') ? fs.readdirSync('/usr/lib/postgresql').sort().reverse().map((v) => `/usr/lib/postgresql/${v}/bin/psql`) : []),
  ];
  return candidates.find((p) => fs.existsSync(p));
}

export function findChromium() {
  return [process.env.KVFLEET_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => p && fs.existsSync(p));
}

export function controlPlaneBin() {
  return process.env.KVFLEET_CONTROLPLANE_BIN || path.join(repoRoot, 'target/debug/kvfleet-controlplane');
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A database of its own, dropped at the end.
export class ThrowawayDb {
  constructor(adminUrl) {
    this.adminUrl = adminUrl;
    this.psql = findPsql();
    if (!this.psql) throw new Error('psql not found (install postgresql-client)');
    this.name = `kvfleet_webui_${process.pid}_${Date.now()}`;
    const u = new URL(adminUrl);
    u.pathname = `/${this.name}`;
    this.url = u.toString();
  }

  create() {
    execFileSync(this.psql, [this.adminUrl, '-q', '-v', 'ON_ERROR_STOP=1', '-c', `CREATE DATABASE ${this.name}`], { stdio: 'pipe' });
  }

  drop() {
    try {
      execFileSync(this.psql, [this.adminUrl, '-q', '-c', `DROP DATABASE IF EXISTS ${this.name} WITH (FORCE)`], { stdio: 'pipe' });
    } catch (e) {
      console.error(`# could not drop ${this.name}: ${e.message}`);
    }
  }
}

// The control plane reads every KVFLEET_<SECTION>__<KEY> variable as configuration and
// refuses unknown ones, so the test's own KVFLEET_* variables (and the model paths the test
// script exports) must not reach it; its configuration comes from flags only.
function childEnv() {
  const env = Object.fromEntries(Object.entries(process.env)
    .filter(([k]) => !k.startsWith('KVFLEET_') && k !== 'DATABASE_URL'));
  env.RUST_LOG = process.env.RUST_LOG || 'info';
  return env;
}

export class ControlPlane {
  // autoApprove: admit joins at once ([join] auto_approve, as a lab would); by default every
  // join waits for an admin, as in production.
  constructor(dbUrl, { autoApprove = false } = {}) {
    this.dbUrl = dbUrl;
    this.autoApprove = autoApprove;
    this.bin = controlPlaneBin();
    this.adminToken = execFileSync(this.bin, ['token', 'generate'], { encoding: 'utf8', env: childEnv() }).trim();
  }

  async start() {
    this.port = await freePort();
    this.base = `http://127.0.0.1:${this.port}`;
    fs.mkdirSync(artifacts, { recursive: true });
    this.logPath = path.join(artifacts, 'controlplane.log');
    const log = fs.openSync(this.logPath, 'w');
    // Short intervals so placement, liveness and the planner act within the test's patience.
    this.proc = spawn(this.bin, ['serve', '--database-url', this.dbUrl, '--listen', `127.0.0.1:${this.port}`,
      '--set', `auth.bootstrap_admin_token=${this.adminToken}`,
      '--set', 'placement.interval=300ms', '--set', 'leader.retry_interval=300ms',
      '--set', 'liveness.heartbeat_interval=500ms', '--set', 'liveness.check_interval=500ms',
      '--set', 'watch.max_wait=5s', '--set', 'planner.interval=1s',
      '--set', `join.auto_approve=${this.autoApprove}`],
    { stdio: ['ignore', log, log], env: childEnv() });
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) break;
      try {
        const r = await fetch(`${this.base}/api/v1/status`);
        if (r.ok) return this;
      } catch { /* not listening yet */ }
      await sleep(100);
    }
    throw new Error(`control plane did not start; see ${this.logPath}:\n${fs.readFileSync(this.logPath, 'utf8').slice(-2000)}`);
  }

  async api(method, p, body, token = this.adminToken) {
    const r = await fetch(`${this.base}/api/v1${p}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await r.text();
    const data = text ? JSON.parse(text) : null;
    if (!r.ok) throw new Error(`${method} ${p}: ${r.status} ${text}`);
    return data;
  }

  async token(role, name = `${role}-${Date.now()}`) {
    return (await this.api('POST', '/tokens', { name, role })).secret;
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill('SIGTERM');
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 15_000);
    await this.exited;
    clearTimeout(t);
  }
}

// The agent protocol, spoken the way kvfleet-agent does: register with a join token, then a
// heartbeat every interval with what the node runs; the desired state says what to run.
export class SimAgent {
  constructor(cp, joinToken, { hostname = 'gpu-node-1', gpus = 2, cpuSlots = 2 } = {}) {
    this.cp = cp;
    this.joinToken = joinToken;
    this.hostname = hostname;
    this.gpus = Array.from({ length: gpus }, (_, i) => ({
      id: randomUUID(), index: i, name: 'NVIDIA H100 80GB HBM3', memory_total_bytes: 80 * 1024 ** 3, pci_bus_id: `00000000:${(0x18 + i).toString(16)}:00.0`,
    }));
    this.cpuSlots = cpuSlots;
    this.workers = new Map(); // worker_id -> { firstSeen, desired, gpu_id, stoppedAt }
    // worker_id -> { engine, error }: reported failed with that reason until deleted, as an
    // agent reports a worker whose engine server will not start.
    this.failures = new Map();
    this.started = Date.now();
    this.beats = 0;
  }

  async register() {
    const r = await this.cp.api('POST', '/agent/register', {
      hostname: this.hostname,
      agent_version: 'webui-test-sim',
      frontend_addr: '127.0.0.1:8000',
      peer_addr: '127.0.0.1:7500',
      addresses: ['127.0.0.1'],
      cpu_slots: this.cpuSlots,
      labels: { zone: 'test-a' },
      gpus: this.gpus,
    }, this.joinToken);
    this.nodeId = r.node_id;
    this.credential = r.credential;
    this.interval = Math.min(500, r.heartbeat_interval_ms);
    return this;
  }

  // Starting for a moment, then ready; draining, then stopped — as a real engine would.
  observe(now) {
    const out = [];
    for (const [id, w] of this.workers) {
      let state;
      if (w.desired === 'running') state = now - w.firstSeen < 1500 ? 'starting' : 'ready';
      else if (w.desired === 'draining') state = 'draining';
      else state = 'stopped';
      const t = (now - this.started) / 1000;
      const metrics = state === 'ready' ? {
        request_rate: 2 + Math.sin(t / 5 + id),
        ttft_p50_ms: 80 + 20 * Math.sin(t / 7),
        ttft_p99_ms: 180 + 40 * Math.sin(t / 7),
        itl_p50_ms: 18 + 3 * Math.sin(t / 3),
        itl_p99_ms: 35 + 5 * Math.sin(t / 3),
        tokens_per_s: 120 + 30 * Math.sin(t / 4 + id),
        kv_blocks_used: Math.min(4096, Math.round(600 + 40 * t + 100 * id) % 4096),
        kv_blocks_total: 4096,
        prefix_hit_rate: 0.45 + 0.3 * Math.abs(Math.sin(t / 9 + id)),
        gpu_utilization: w.gpu_id ? 0.6 + 0.3 * Math.abs(Math.sin(t / 6)) : null,
      } : undefined;
      const failure = this.failures.get(id);
      if (failure) {
        out.push({ worker_id: id, state: 'failed', engine: failure.engine, error: failure.error });
        continue;
      }
      out.push({ worker_id: id, state, ...(metrics ? { metrics } : {}) });
    }
    return out;
  }

  async tick() {
    const desired = await this.cp.api('GET', '/agent/desired-state', undefined, this.credential);
    const now = Date.now();
    const listed = new Set();
    for (const w of desired.workers) {
      listed.add(w.worker_id);
      const known = this.workers.get(w.worker_id);
      if (known) known.desired = w.desired_state;
      else this.workers.set(w.worker_id, { firstSeen: now, desired: w.desired_state, gpu_id: w.gpu_id });
    }
    // A worker the desired state no longer lists must stop; report it stopped once, then forget it.
    for (const [id, w] of this.workers) {
      if (!listed.has(id)) {
        if (w.desired === 'gone') this.workers.delete(id);
        else w.desired = 'gone';
      }
    }
    const workers = this.observe(now);
    const t = (now - this.started) / 1000;
    const gpus = this.gpus.map((g, i) => {
      const busy = [...this.workers.values()].filter((w) => w.gpu_id === g.id && w.desired === 'running').length;
      return {
        id: g.id,
        utilization: busy ? Math.min(1, 0.55 + 0.35 * Math.abs(Math.sin(t / 6 + i))) : 0.02,
        memory_used_bytes: busy ? Math.round(g.memory_total_bytes * 0.62) : 512 * 1024 ** 2,
      };
    });
    await this.cp.api('POST', '/agent/heartbeat', { workers, gpus }, this.credential);
    this.beats += 1;
    await this.uploadKv(workers);
  }

  // Once a worker is ready, its cache as an engine with offload would announce it: three
  // blocks in G1, two in host memory (G2), one on disk (G3). Each block starts a prompt (no
  // parent), so its sequence hash is its local hash and the chain check holds.
  async uploadKv(observed) {
    const events = [];
    for (const { worker_id: id, state } of observed) {
      const w = this.workers.get(id);
      if (state !== 'ready' || !w || w.kvSent) continue;
      w.kvSent = true;
      const tiers = [['g1', 3], ['g2', 2], ['g3', 1]];
      let eventId = 0;
      for (const [tier, blocks] of tiers) {
        for (let i = 0; i < blocks; i += 1) {
          const hash = id * 1000 + eventId + 1;
          events.push({ worker: id, event_id: eventId, tier, type: 'stored', parent: null, blocks: [{ local: hash, sequence: hash }] });
          eventId += 1;
        }
      }
    }
    if (events.length) await this.cp.api('POST', '/agent/kv-events', { epochs: [], events, loads: [] }, this.credential);
  }

  run() {
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        try { await this.tick(); } catch (e) { this.lastError = e; }
        await sleep(this.interval);
      }
    })();
    return this;
  }

  async stop() {
    this.running = false;
    await this.loop;
  }
}

export async function waitFor(fn, { timeout = 20_000, interval = 200, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    await sleep(interval);
  }
  throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
}

export function agentBin() {
  return process.env.KVFLEET_AGENT_BIN || path.join(repoRoot, 'target/debug/kvfleet-agent');
}

// The real node agent, configured to join the control plane with a join token.
export class RealAgent {
  constructor(cp, joinToken, { hostname = 'cpu-node-1', cpuSlots = 2 } = {}) {
    this.cp = cp;
    this.joinToken = joinToken;
    this.hostname = hostname;
    this.cpuSlots = cpuSlots;
    this.bin = agentBin();
  }

  async writeConfig() {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvfleet-webui-agent-'));
    this.port = await freePort();
    this.configPath = path.join(this.dir, 'agent.toml');
    fs.writeFileSync(this.configPath, [
      '[node]', `name = "${this.hostname}"`, '',
      '[frontend]', `listen = "127.0.0.1:${this.port}"`, '',
      '[supervisor]', `socket_dir = "${path.join(this.dir, 'run')}"`, '',
      '[control_plane]', `url = "${this.cp.base}"`, `join_token = "${this.joinToken}"`,
      `state_dir = "${path.join(this.dir, 'state')}"`, `cpu_slots = ${this.cpuSlots}`,
      'heartbeat_interval_ms = 500', 'watch_wait_secs = 5', 'labels = { zone = "test-a" }', '',
    ].join('\n'));
    return this.configPath;
  }

  // Why this agent binary cannot join a control plane, or null when it can. An agent built
  // before its control-plane client existed refuses the [control_plane] section.
  async unsupported() {
    if (!fs.existsSync(this.bin)) return `no agent binary at ${this.bin}`;
    await this.writeConfig();
    const r = spawnSync(this.bin, ['check-config', this.configPath], { encoding: 'utf8', env: childEnv() });
    if (r.status === 0) return null;
    const out = `${r.stdout}${r.stderr}`;
    if (/control_plane/.test(out) && /unknown/.test(out)) return 'this kvfleet-agent has no control-plane client yet';
    throw new Error(`kvfleet-agent check-config failed:\n${out}`);
  }

  async start() {
    if (!this.configPath) await this.writeConfig();
    this.logPath = path.join(artifacts, `agent-${this.hostname}.log`);
    const log = fs.openSync(this.logPath, 'w');
    this.proc = spawn(this.bin, ['run', '--config', this.configPath], { stdio: ['ignore', log, log], env: childEnv() });
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    await waitFor(async () => {
      if (this.proc.exitCode !== null) throw new Error(`kvfleet-agent exited; see ${this.logPath}`);
      const nodes = await this.cp.api('GET', '/nodes');
      const node = nodes.items.find((n) => n.hostname === this.hostname);
      if (node) this.nodeId = node.id;
      return node;
    }, { what: 'the agent to register', timeout: 30_000 }).catch((e) => {
      throw new Error(`${e.message}\n${fs.readFileSync(this.logPath, 'utf8').slice(-3000)}`);
    });
    return this;
  }

  async stop() {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill('SIGTERM');
      const t = setTimeout(() => this.proc.kill('SIGKILL'), 20_000);
      await this.exited;
      clearTimeout(t);
    }
    if (this.dir) fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
