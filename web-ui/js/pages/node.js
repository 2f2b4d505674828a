// One node: its inventory, GPUs, workers and the control plane's decisions about it, with
// cordon / uncordon / drain for operators, and approve / reject (a pending join) and remove
// for admins.

import { get, post, del, all } from '/ui/js/api.js';
import { h, patch, badge, announce } from '/ui/js/dom.js';
import { gpusTable, workersTable } from '/ui/js/pages/overview.js';
import { timeline } from '/ui/js/pages/decisions.js';
import { ago, time, stateTone } from '/ui/js/format.js';

export const title = 'Node';

const labelsText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(', ') || '—';

export async function mount(ctx) {
  const [id] = ctx.params;
  const slots = { head: h('div', {}), info: h('div', {}), gpus: h('div', {}), workers: h('div', {}), decisions: h('div', {}) };
  const actions = h('div', { class: 'actions page-actions', role: 'group', 'aria-label': 'Node actions' });
  const status = h('p', { class: 'form-error', role: 'alert', hidden: true });
  ctx.root.append(
    h('p', {}, h('a', { href: '/ui/', 'data-link': true }, '← Fleet overview')),
    slots.head, actions, status, slots.info,
    h('section', { 'aria-labelledby': 'h-gpus' }, h('h2', { id: 'h-gpus' }, 'GPUs'), slots.gpus),
    h('section', { 'aria-labelledby': 'h-workers' }, h('h2', { id: 'h-workers' }, 'Workers'), slots.workers),
    h('section', { 'aria-labelledby': 'h-dec' }, h('h2', { id: 'h-dec' }, 'Recent decisions'), slots.decisions));

  let node = null;
  const act = async (label, fn) => {
    status.hidden = true;
    try {
      node = await fn();
      announce(`${label}: done`);
      await refresh();
    } catch (e) {
      status.textContent = `${label} failed: ${e.message}`;
      status.hidden = false;
    }
  };
  const drawActions = () => {
    // Only what the role may do is offered; a viewer sees no buttons here at all.
    const buttons = [];
    // A pending join: the admin's first decision is whether it is in the fleet at all.
    if (ctx.can('admin') && node.approval === 'pending' && node.state !== 'removed') {
      buttons.push(h('button', { type: 'button', onclick: () => act('Approve', () => post(`/nodes/${id}/approve`)) }, 'Approve'));
      buttons.push(h('button', { type: 'button', class: 'danger', onclick: () => {
        // eslint-disable-next-line no-alert
        if (window.confirm(`Reject node ${node.hostname}? Its credential is revoked; it needs a new join token to ask again.`)) act('Reject', () => post(`/nodes/${id}/reject`));
      } }, 'Reject'));
    }
    if (ctx.can('operate') && node.state !== 'removed' && node.approval !== 'pending') {
      if (node.cordoned) buttons.push(h('button', { type: 'button', class: 'secondary', onclick: () => act('Uncordon', () => post(`/nodes/${id}/uncordon`)) }, node.draining ? 'Stop draining (uncordon)' : 'Uncordon'));
      else buttons.push(h('button', { type: 'button', class: 'secondary', onclick: () => act('Cordon', () => post(`/nodes/${id}/cordon`)) }, 'Cordon'));
      if (!node.draining) buttons.push(h('button', { type: 'button', class: 'secondary', onclick: () => act('Drain', () => post(`/nodes/${id}/drain`)) }, 'Drain'));
    }
    if (ctx.can('admin') && node.state !== 'removed' && node.approval !== 'pending') {
      buttons.push(h('button', { type: 'button', class: 'danger', onclick: () => {
        // eslint-disable-next-line no-alert
        if (window.confirm(`Remove node ${node.hostname}? Its workers stop and its credentials are revoked.`)) act('Remove', () => del(`/nodes/${id}`));
      } }, 'Remove node'));
    }
    // Keep the focused button when nothing changed, so keyboard users do not lose their place.
    const key = buttons.map((b) => b.textContent).join('|');
    if (actions.dataset.key !== key) { actions.replaceChildren(...buttons); actions.dataset.key = key; }
  };

  const refresh = async () => {
    const [n, gpus, workers, deployments, decisions] = await Promise.all([
      get(`/nodes/${encodeURIComponent(id)}`), all(`/gpus?node_id=${id}`), all(`/workers?node_id=${id}`),
      all('/deployments'), get(`/decisions?node_id=${id}&limit=20`)]);
    node = n;
    ctx.setTitle(node.hostname);
    patch(slots.head, h('h1', {}, node.hostname, ' ', badge(node.state, stateTone(node.state)),
      node.approval === 'pending' ? [' ', badge('pending approval', 'warn')] : null,
      node.approval === 'rejected' ? [' ', badge('rejected', 'bad')] : null,
      node.draining ? [' ', badge('draining', 'info')] : node.cordoned ? [' ', badge('cordoned', 'warn')] : null));
    drawActions();
    patch(slots.info, h('dl', { class: 'kv panel' },
      h('dt', {}, 'Node id'), h('dd', { class: 'mono' }, node.id),
      h('dt', {}, 'Last heartbeat'), h('dd', {}, `${ago(node.last_heartbeat_at)} (${time(node.last_heartbeat_at)})`),
      h('dt', {}, 'State since'), h('dd', {}, time(node.state_changed_at)),
      h('dt', {}, 'Agent version'), h('dd', {}, node.agent_version || '—'),
      h('dt', {}, 'Frontend'), h('dd', { class: 'mono' }, node.frontend_addr || '—'),
      h('dt', {}, 'Peer endpoint'), h('dd', { class: 'mono' }, node.peer_addr || '—'),
      h('dt', {}, 'Addresses'), h('dd', { class: 'mono' }, node.addresses.join(', ') || '—'),
      h('dt', {}, 'Approval'), h('dd', {}, node.approval === 'pending'
        ? 'waiting for an admin: no workers and no peer certificate until approved'
        : node.approval),
      h('dt', {}, 'Labels'), h('dd', {}, labelsText(node.labels)),
      h('dt', {}, 'Reported labels'), h('dd', {}, labelsText(node.reported_labels)),
      h('dt', {}, 'Admin labels'), h('dd', {}, labelsText(node.admin_labels)),
      h('dt', {}, 'CPU slots'), h('dd', {}, String(node.cpu_slots)),
      h('dt', {}, 'Desired-state generation'), h('dd', {}, String(node.desired_generation))));
    patch(slots.gpus, gpusTable(gpus, [node], workers, deployments));
    patch(slots.workers, workersTable(workers, { nodes: [node], gpus, deployments }));
    patch(slots.decisions, timeline(decisions.items, { deployments, nodes: [node] }));
  };
  await ctx.poll(refresh);
}
