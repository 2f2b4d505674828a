// Decisions as timelines with their reasons: the SLA planner's (GET /planner/decisions: reason,
// inputs, outcome, arithmetic; the fleet's GPU budget above them) and every loop's changes
// (GET /decisions: the audit rows placement, liveness and the planner write).

import { get, all } from '/ui/js/api.js';
import { h, patch, badge } from '/ui/js/dom.js';
import { time, shortId } from '/ui/js/format.js';
import { plannerTimeline, budgetPanel, loadDecisions } from '/ui/js/pages/planner.js';

export const title = 'Decisions';

const TONE = { placement: 'info', liveness: 'warn', planner: 'ok' };

export function timeline(items, { deployments = [], nodes = [] } = {}) {
  if (!items.length) return h('p', { class: 'empty' }, 'No decisions yet.');
  const dep = Object.fromEntries(deployments.map((d) => [d.id, d.name]));
  const host = Object.fromEntries(nodes.map((n) => [n.id, n.hostname]));
  return h('ol', { class: 'timeline', 'aria-label': 'Decisions, newest first' }, items.map((d) => h('li', { 'data-action': d.action },
    h('div', {},
      h('time', { class: 'when', datetime: d.at }, time(d.at)),
      badge(d.source, TONE[d.source] || 'muted'), ' ',
      h('strong', {}, d.action), ' ',
      h('span', { class: 'mono' }, d.target_type === 'worker' ? `w${d.target_id}` : `${d.target_type} ${shortId(d.target_id)}`),
      d.deployment_id ? [' · ', h('a', { href: `/ui/deployments/${d.deployment_id}`, 'data-link': true }, dep[d.deployment_id] || shortId(d.deployment_id))] : null,
      d.node_id ? [' · ', h('a', { href: `/ui/nodes/${d.node_id}`, 'data-link': true }, host[d.node_id] || shortId(d.node_id))] : null),
    h('div', { class: 'reason' }, d.reason))));
}

export async function mount(ctx) {
  const source = h('select', { id: 'dec-source', name: 'source' },
    [['', 'all loops'], ['placement', 'placement'], ['liveness', 'liveness'], ['planner', 'planner']].map(([v, t]) => h('option', { value: v }, t)));
  const slot = h('div', {});
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Show older');
  const budget = h('div', {});
  const planner = h('div', {});
  const changesOnly = h('input', { type: 'checkbox', id: 'planner-changes', checked: true });
  ctx.root.append(h('h1', {}, 'Placement and planner decisions'),
    h('p', { class: 'muted' }, 'What the control plane decided on its own, newest first, and why.'),
    h('section', { 'aria-labelledby': 'h-planner' }, h('h2', { id: 'h-planner' }, 'SLA planner'), budget,
      h('div', { class: 'toolbar' }, h('div', { class: 'field' }, changesOnly, h('label', { for: 'planner-changes' }, 'Only rounds that changed something'))),
      planner),
    h('section', { 'aria-labelledby': 'h-changes' }, h('h2', { id: 'h-changes' }, 'Changes by placement, liveness and the planner'),
      h('div', { class: 'toolbar' }, h('div', { class: 'field' }, h('label', { for: 'dec-source' }, 'Source'), source)),
      slot, more));
  const refreshPlanner = async () => {
    const [settings, items] = await Promise.all([get('/planner'), loadDecisions(null, 30, changesOnly.checked)]);
    if (!budget.contains(document.activeElement)) patch(budget, budgetPanel(ctx, settings, refreshPlanner));
    patch(planner, plannerTimeline(items));
  };
  changesOnly.addEventListener('change', () => refreshPlanner().catch(() => {}));
  ctx.poll(refreshPlanner, 3000);
  let limit = 50;
  const refresh = async () => {
    const q = `limit=${limit}${source.value ? `&source=${source.value}` : ''}`;
    const [page, deployments, nodes] = await Promise.all([get(`/decisions?${q}`), all('/deployments'), all('/nodes')]);
    patch(slot, timeline(page.items, { deployments, nodes }));
    more.hidden = !page.next_cursor || limit >= 500;
  };
  source.addEventListener('change', () => refresh().catch(() => {}));
  more.addEventListener('click', () => { limit = Math.min(500, limit + 50); refresh().catch(() => {}); });
  await ctx.poll(refresh, 3000);
}
