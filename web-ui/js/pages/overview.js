// Fleet overview: nodes, GPUs (utilization, memory), workers (roles, states), and the fleet's
// request rate and latency, live.

import { all, metrics } from '/ui/js/api.js';
import { h, patch, table, badge } from '/ui/js/dom.js';
import { lineChart, mergeSeries } from '/ui/js/chart.js';
import { bytes, pct, ms, num, ago, stateTone, shortId } from '/ui/js/format.js';

export const title = 'Fleet overview';

export async function mount(ctx) {
  const slots = {
    tiles: h('div', { class: 'tiles', 'aria-label': 'Fleet summary', role: 'group' }),
    charts: h('div', {}),
    nodes: h('div', {}), gpus: h('div', {}), workers: h('div', {}),
  };
  ctx.root.append(
    h('h1', {}, 'Fleet overview'),
    slots.tiles,
    slots.charts,
    h('section', { 'aria-labelledby': 'h-nodes' }, h('h2', { id: 'h-nodes' }, 'Nodes'), slots.nodes),
    h('section', { 'aria-labelledby': 'h-gpus' }, h('h2', { id: 'h-gpus' }, 'GPUs'), slots.gpus),
    h('section', { 'aria-labelledby': 'h-workers' }, h('h2', { id: 'h-workers' }, 'Workers'), slots.workers));

  let fleet = { nodes: [], gpus: [], workers: [], deployments: [] };
  let latest = {};
  const drawTiles = () => {
    const live = fleet.nodes.filter((n) => n.state !== 'removed');
    const healthy = live.filter((n) => n.state === 'healthy').length;
    const ready = fleet.workers.filter((w) => w.observed_state === 'ready').length;
    const util = fleet.gpus.filter((g) => g.utilization !== null);
    const avgUtil = util.length ? util.reduce((a, g) => a + g.utilization, 0) / util.length : null;
    const tile = (label, value, sub, key) => h('div', { class: 'tile', 'data-tile': key },
      h('div', { class: 'label' }, label), h('div', { class: 'value' }, value), h('div', { class: 'sub' }, sub));
    patch(slots.tiles, h('div', { class: 'tiles' },
      tile('Nodes', `${healthy}/${live.length}`, 'healthy', 'nodes'),
      tile('GPUs', String(fleet.gpus.length), `avg utilization ${pct(avgUtil)}`, 'gpus'),
      tile('Workers', `${ready}/${fleet.workers.length}`, 'ready', 'workers'),
      tile('Requests/s', num(latest.request_rate, 2), `${num(latest.tokens_per_s, 0)} tokens/s`, 'rps'),
      tile('TTFT', ms(latest.ttft_p50_ms), `p99 ≤ ${ms(latest.ttft_p99_ms)}`, 'ttft'),
      tile('ITL', ms(latest.itl_p50_ms), `p99 ≤ ${ms(latest.itl_p99_ms)}`, 'itl')));
  };

  await ctx.poll(async () => {
    const [nodes, gpus, workers, deployments] = await Promise.all([
      all('/nodes'), all('/gpus'), all('/workers'), all('/deployments')]);
    fleet = { nodes, gpus, workers, deployments };
    drawTiles();
    patch(slots.nodes, nodesTable(nodes.filter((n) => n.state !== 'removed'), workers, gpus));
    patch(slots.gpus, gpusTable(gpus, nodes, workers, deployments));
    patch(slots.workers, workersTable(workers, { nodes, gpus, deployments }));
  });

  ctx.poll(async () => {
    const series = await Promise.all(fleet.deployments.map((d) => metrics('deployments', d.id)));
    const merged = mergeSeries(series);
    const last = merged.at(-1) || {};
    latest = last;
    drawTiles();
    const pts = (f) => merged.map((p) => ({ t: p.t, v: p[f] }));
    patch(slots.charts, h('div', { class: 'grid' },
      lineChart('Requests per second (fleet)', [{ name: 'requests/s', points: pts('request_rate') }], { yFormat: (v) => num(v, 1) }),
      lineChart('Latency (fleet)', [
        { name: 'TTFT p50', points: pts('ttft_p50_ms') },
        { name: 'TTFT p99', points: pts('ttft_p99_ms') },
        { name: 'ITL p50', points: pts('itl_p50_ms') },
      ], { yFormat: ms })));
  }, 5000);
}

export function nodesTable(nodes, workers, gpus) {
  return table([
    { label: 'Node', key: 'hostname', value: (n) => h('a', { href: `/ui/nodes/${n.id}`, 'data-link': true }, n.hostname) },
    { label: 'State', key: 'state', value: (n) => [badge(n.state, stateTone(n.state)),
      n.approval === 'pending' ? [' ', badge('pending approval', 'warn')] : null,
      n.draining ? [' ', badge('draining', 'info')] : n.cordoned ? [' ', badge('cordoned', 'warn')] : null] },
    { label: 'GPUs', key: 'gpus', num: true, value: (n) => String(gpus.filter((g) => g.node_id === n.id).length) },
    { label: 'CPU slots', key: 'cpu', num: true, value: (n) => String(n.cpu_slots) },
    { label: 'Workers', key: 'workers', num: true, value: (n) => {
      const mine = workers.filter((w) => w.node_id === n.id);
      return `${mine.filter((w) => w.observed_state === 'ready').length}/${mine.length}`;
    } },
    { label: 'Last heartbeat', key: 'heartbeat', value: (n) => ago(n.last_heartbeat_at) },
    { label: 'Agent', key: 'agent', value: (n) => n.agent_version || '—' },
  ], nodes, { caption: 'Nodes', empty: 'No nodes yet. Start kvfleet-agent on a machine with a join token.', rowAttrs: (n) => ({ 'data-node': n.hostname }) });
}

export function gpusTable(gpus, nodes, workers, deployments) {
  const host = Object.fromEntries(nodes.map((n) => [n.id, n.hostname]));
  const depName = Object.fromEntries(deployments.map((d) => [d.id, d.name]));
  const hasTemp = gpus.some((g) => g.temperature_c !== undefined && g.temperature_c !== null);
  const cols = [
    { label: 'Node', value: (g) => h('a', { href: `/ui/nodes/${g.node_id}`, 'data-link': true }, host[g.node_id] || shortId(g.node_id)) },
    { label: '#', num: true, value: (g) => String(g.device_index) },
    { label: 'GPU', value: (g) => g.name },
    { label: 'Utilization', key: 'util', value: (g) => g.utilization === null ? '—'
      : [h('meter', { min: 0, max: 1, low: 0.7, high: 0.9, optimum: 0.5, value: g.utilization, 'aria-label': `utilization ${pct(g.utilization)}` }), ' ', pct(g.utilization)] },
    { label: 'Memory', key: 'memory', value: (g) => g.memory_used_bytes === null ? `— / ${bytes(g.memory_total_bytes)}`
      : [h('meter', { min: 0, max: g.memory_total_bytes, high: g.memory_total_bytes * 0.9, value: g.memory_used_bytes, 'aria-label': `memory ${bytes(g.memory_used_bytes)} of ${bytes(g.memory_total_bytes)}` }),
        ' ', `${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}`] },
  ];
  if (hasTemp) cols.push({ label: 'Temp.', num: true, value: (g) => (g.temperature_c === null ? '—' : `${g.temperature_c} °C`) });
  cols.push({ label: 'Serving', value: (g) => workers.filter((w) => w.gpu_id === g.id).map((w) => `${depName[w.deployment_id] || 'worker'} (${w.role})`).join(', ') || 'idle' });
  return table(cols, gpus, { caption: 'GPUs', empty: 'No GPUs reported.' });
}

export function workersTable(workers, { nodes, gpus, deployments }) {
  const host = Object.fromEntries(nodes.map((n) => [n.id, n.hostname]));
  const gpu = Object.fromEntries(gpus.map((g) => [g.id, g]));
  const dep = Object.fromEntries(deployments.map((d) => [d.id, d]));
  return table([
    { label: 'Worker', key: 'id', value: (w) => h('span', { class: 'mono' }, `w${w.id}`) },
    { label: 'Deployment', key: 'deployment', value: (w) => dep[w.deployment_id]
      ? h('a', { href: `/ui/deployments/${w.deployment_id}`, 'data-link': true }, dep[w.deployment_id].name) : shortId(w.deployment_id) },
    { label: 'Node', key: 'node', value: (w) => h('a', { href: `/ui/nodes/${w.node_id}`, 'data-link': true }, host[w.node_id] || shortId(w.node_id)) },
    { label: 'Slot', value: (w) => (w.gpu_id ? (gpu[w.gpu_id] ? `GPU ${gpu[w.gpu_id].device_index}` : 'GPU') : 'CPU') },
    { label: 'Role', key: 'role', value: (w) => w.role },
    { label: 'Desired', key: 'desired', value: (w) => w.desired_state },
    { label: 'State', key: 'state', value: (w) => (w.observed_error
      // Why it failed, as its agent reported (an engine server that does not start, say).
      ? h('span', {}, badge(w.observed_state, stateTone(w.observed_state)), ' ',
        h('span', { class: 'muted', 'data-error': true, title: w.observed_error }, w.observed_error))
      : badge(w.observed_state, stateTone(w.observed_state))) },
    { label: 'Engine', value: (w) => w.observed_engine || '—' },
    { label: 'Since', value: (w) => ago(w.observed_at || w.created_at) },
  ], workers, { caption: 'Workers', empty: 'No workers. Create a deployment to place some.', rowAttrs: (w) => ({ 'data-worker': w.id, 'data-state': w.observed_state }) });
}
