// KV cache: per-worker block usage and prefix-cache hit rate, now and over the last 15
// minutes, from the metrics API (what the agents report in their heartbeats); blocks per tier
// (G1 device, G2 host memory, G3 disk) from the fleet KV index.

import { all, get, metrics } from '/ui/js/api.js';
import { h, patch, table } from '/ui/js/dom.js';
import { lineChart, pointsOf } from '/ui/js/chart.js';
import { pct, shortId } from '/ui/js/format.js';

export const title = 'KV cache';

// Metrics requests per refresh are bounded; the busiest workers of a big fleet still show.
const MAX_WORKERS = 24;

export async function mount(ctx) {
  const slots = { index: h('div', {}), table: h('div', {}), charts: h('div', {}) };
  const minutes = h('select', { id: 'kv-window', name: 'window' },
    [5, 15, 60].map((m) => h('option', { value: String(m), selected: m === 15 }, `last ${m} min`)));
  ctx.root.append(h('h1', {}, 'KV cache'),
    h('div', { class: 'toolbar' }, h('div', { class: 'field' }, h('label', { for: 'kv-window' }, 'Window'), minutes)),
    slots.index,
    slots.charts,
    h('section', { 'aria-labelledby': 'h-kv-now' }, h('h2', { id: 'h-kv-now' }, 'Per worker, now'), slots.table));

  const refresh = async () => {
    // The control plane's fleet-wide index (what routers are fed); absent on an older server.
    const optional = (path) => get(path).catch((e) => (e.status === 404 ? null : Promise.reject(e)));
    const [workers, deployments, nodes, index, perTier] = await Promise.all([all('/workers'), all('/deployments'), all('/nodes'),
      optional('/kv/stats'), optional('/kv/workers')]);
    // Blocks per tier and worker, as the index knows them: whether offload to host memory and
    // disk is working shows here before it shows in hit rates.
    const tiers = Object.fromEntries((perTier || []).map((b) => [b.worker, b]));
    const total = (tier) => (perTier || []).reduce((sum, b) => sum + b[tier], 0);
    const tile = (label, value, key) => h('div', { class: 'tile', 'data-tile': key }, h('div', { class: 'label' }, label), h('div', { class: 'value' }, value));
    patch(slots.index, index ? h('div', { class: 'tiles', role: 'group', 'aria-label': 'KV index' },
      tile('Blocks in the fleet index', String(index.blocks), 'kv-blocks'),
      tile('Workers in the index', String(index.workers), 'kv-workers'),
      tile('Event sequence', String(index.head_seq), 'kv-seq'),
      ...(perTier ? [tile('G1 blocks (device)', String(total('g1')), 'kv-g1'),
        tile('G2 blocks (host memory)', String(total('g2')), 'kv-g2'),
        tile('G3 blocks (local disk)', String(total('g3')), 'kv-g3')] : [])) : h('div', {}));
    const dep = Object.fromEntries(deployments.map((d) => [d.id, d.name]));
    const host = Object.fromEntries(nodes.map((n) => [n.id, n.hostname]));
    const shown = workers.filter((w) => w.desired_state !== 'stopped').slice(0, MAX_WORKERS);
    const series = await Promise.all(shown.map((w) => metrics('workers', w.id, Number(minutes.value))));
    const name = (w) => `w${w.id} ${dep[w.deployment_id] || shortId(w.deployment_id)}`;
    const usage = (m) => (m.points || []).map((p) => ({ t: new Date(p.at).getTime(), v: p.kv_blocks_total ? p.kv_blocks_used / p.kv_blocks_total : null }));
    const now = Date.now();
    const from = now - Number(minutes.value) * 60_000;
    patch(slots.charts, h('div', { class: 'grid' },
      lineChart('KV blocks in use (share of each worker\u2019s cache)', shown.map((w, i) => ({ name: name(w), points: usage(series[i]) })), { yFormat: pct, yMax: 1, from, to: now }),
      lineChart('Prefix-cache hit rate', shown.map((w, i) => ({ name: name(w), points: pointsOf(series[i], 'prefix_hit_rate') })), { yFormat: pct, yMax: 1, from, to: now })));
    const last = (i) => series[i].points.at(-1) || null;
    const rows = shown.map((w, i) => ({ w, p: last(i) }));
    patch(slots.table, table([
      { label: 'Worker', key: 'worker', value: ({ w }) => h('span', { class: 'mono' }, `w${w.id}`) },
      { label: 'Deployment', value: ({ w }) => h('a', { href: `/ui/deployments/${w.deployment_id}`, 'data-link': true }, dep[w.deployment_id] || shortId(w.deployment_id)) },
      { label: 'Node', value: ({ w }) => h('a', { href: `/ui/nodes/${w.node_id}`, 'data-link': true }, host[w.node_id] || shortId(w.node_id)) },
      { label: 'Role', value: ({ w }) => w.role },
      { label: 'Blocks used', key: 'blocks', value: ({ p }) => (p && p.kv_blocks_total
        ? [h('meter', { min: 0, max: p.kv_blocks_total, high: p.kv_blocks_total * 0.9, value: p.kv_blocks_used, 'aria-label': `${Math.round(p.kv_blocks_used)} of ${Math.round(p.kv_blocks_total)} blocks` }), ' ', `${Math.round(p.kv_blocks_used)} / ${Math.round(p.kv_blocks_total)}`]
        : '—') },
      { label: 'G1', key: 'g1', num: true, value: ({ w }) => String(tiers[w.id]?.g1 ?? '—') },
      { label: 'G2', key: 'g2', num: true, value: ({ w }) => String(tiers[w.id]?.g2 ?? '—') },
      { label: 'G3', key: 'g3', num: true, value: ({ w }) => String(tiers[w.id]?.g3 ?? '—') },
      { label: 'Hit rate', key: 'hit', num: true, value: ({ p }) => pct(p?.prefix_hit_rate) },
    ], rows, { caption: 'KV cache per worker', empty: 'No live workers.', rowAttrs: ({ w }) => ({ 'data-worker': w.id }) }));
  };
  minutes.addEventListener('change', () => refresh().catch(() => {}));
  await ctx.poll(refresh, 5000);
}
