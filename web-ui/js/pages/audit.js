// The audit log (admin): every change, by whom, with before/after, newest first.

import { get } from '/ui/js/api.js';
import { h, patch, table } from '/ui/js/dom.js';
import { time } from '/ui/js/format.js';

export const title = 'Audit log';

export async function mount(ctx) {
  const action = h('input', { id: 'audit-action', name: 'action', placeholder: 'e.g. deployment.create', autocomplete: 'off' });
  const target = h('select', { id: 'audit-target', name: 'target_type' },
    [['', 'any'], ...['node', 'deployment', 'model', 'worker', 'token'].map((t) => [t, t])].map(([v, t]) => h('option', { value: v }, t)));
  const slot = h('div', {});
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Show older');
  ctx.root.append(h('h1', {}, 'Audit log'),
    h('form', { class: 'toolbar', role: 'search', 'aria-label': 'Filter the audit log', onsubmit: (e) => { e.preventDefault(); refresh().catch(() => {}); } },
      h('div', { class: 'field' }, h('label', { for: 'audit-action' }, 'Action'), action),
      h('div', { class: 'field' }, h('label', { for: 'audit-target' }, 'Target type'), target),
      h('button', { type: 'submit' }, 'Filter')),
    slot, more);
  let limit = 100;
  const refresh = async () => {
    const q = new URLSearchParams({ limit: String(limit) });
    if (action.value.trim()) q.set('action', action.value.trim());
    if (target.value) q.set('target_type', target.value);
    const page = await get(`/audit?${q}`);
    const json = (v) => (v === null || v === undefined ? '—' : JSON.stringify(v, null, 2));
    patch(slot, table([
      { label: 'When', key: 'at', value: (a) => h('time', { datetime: a.at }, time(a.at)) },
      { label: 'Actor', key: 'actor', value: (a) => a.actor },
      { label: 'Action', key: 'action', value: (a) => h('strong', {}, a.action) },
      { label: 'Target', key: 'target', value: (a) => h('span', { class: 'mono' }, `${a.target_type} ${a.target_id || ''}`) },
      { label: 'Change', value: (a) => h('details', {}, h('summary', {}, 'before / after'),
        h('pre', { class: 'mono' }, `before: ${json(a.before)}\nafter: ${json(a.after)}`)) },
    ], page.items, { caption: 'Audit log', empty: 'No entries match.', rowAttrs: (a) => ({ 'data-action': a.action }) }));
    more.hidden = !page.next_cursor || limit >= 500;
  };
  more.addEventListener('click', () => { limit = Math.min(500, limit + 100); refresh().catch(() => {}); });
  await ctx.poll(refresh, 5000);
}
