// API tokens (admin): who can use the API and the UI, join tokens for new nodes, and agent
// credentials (read-only here; registration mints them). A new token's secret is shown once.

import { get, post, del } from '/ui/js/api.js';
import { h, patch, table, badge, field, formError, showProblem, clearErrors, announce } from '/ui/js/dom.js';
import { ago, time } from '/ui/js/format.js';

export const title = 'Tokens';

export async function mount(ctx) {
  const list = h('div', {});
  const listError = h('p', { class: 'form-error', role: 'alert', hidden: true });
  const created = h('div', { 'aria-live': 'polite' });
  const form = h('form', { class: 'card', novalidate: true, 'aria-labelledby': 'h-new-token' },
    h('h2', { id: 'h-new-token' }, 'Create a token'),
    h('div', { class: 'fields' },
      field({ label: 'Name', name: 'name', hint: 'who or what uses it' }),
      field({ label: 'Role', name: 'role', value: 'viewer', options: ['viewer', 'operator', 'admin', 'join'] }),
      field({ label: 'Expires in (hours)', name: 'expires_in_s', type: 'number', step: 'any', hint: 'empty: never' })),
    formError(),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create token')));
  ctx.root.append(h('h1', {}, 'Tokens'), form, created,
    h('section', { 'aria-labelledby': 'h-tokens' }, h('h2', { id: 'h-tokens' }, 'All tokens'), listError, list));

  const refresh = async () => {
    const page = await get('/tokens?limit=500');
    const live = (t) => !t.revoked_at && !(t.expires_at && new Date(t.expires_at) < new Date());
    patch(list, table([
      { label: 'Name', key: 'name', value: (t) => t.name },
      { label: 'Role', key: 'role', value: (t) => t.role },
      { label: 'Prefix', value: (t) => h('span', { class: 'mono' }, t.prefix) },
      { label: 'Status', key: 'status', value: (t) => (t.revoked_at ? badge('revoked', 'bad') : live(t) ? badge('active', 'ok') : badge('expired', 'warn')) },
      { label: 'Created', value: (t) => time(t.created_at) },
      { label: 'Expires', value: (t) => (t.expires_at ? time(t.expires_at) : 'never') },
      { label: 'Last used', value: (t) => ago(t.last_used_at) },
      { label: 'Actions', value: (t) => (t.revoked_at || t.id === ctx.me.token_id ? (t.id === ctx.me.token_id ? 'this session' : '—')
        : h('button', { type: 'button', class: 'danger', 'aria-label': `Revoke token ${t.name}`, onclick: async () => {
          // eslint-disable-next-line no-alert
          if (!window.confirm(`Revoke token ${t.name} (${t.prefix})? Whatever uses it loses access at once.`)) return;
          listError.hidden = true;
          try { await del(`/tokens/${t.id}`); announce(`Revoked ${t.name}`); await refresh(); } catch (e) { listError.textContent = e.message; listError.hidden = false; }
        } }, 'Revoke')) },
    ], page.items, { caption: 'Tokens', empty: 'No tokens.', rowAttrs: (t) => ({ 'data-token': t.name }) }));
  };

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors(form);
    const el = form.elements;
    const hours = el.expires_in_s.value.trim();
    const body = { name: el.namedItem('name').value.trim(), role: el.role.value };
    if (hours !== '') body.expires_in_s = Math.round(Number(hours) * 3600);
    try {
      const result = await post('/tokens', body);
      // A join token from a control plane serving HTTPS from the fleet CA also carries the CA's
      // fingerprint (kvfj1.<hex>.<secret>): the one string a new node's agent needs.
      const paste = result.join_token || result.secret;
      const secret = h('code', { class: 'mono', 'data-secret': true }, paste);
      created.replaceChildren(h('div', { class: 'panel' },
        h('h2', {}, `Token ${result.token.name} (${result.token.role})`),
        h('p', {}, 'Copy it now: it is shown only once and only its hash is stored.'),
        result.join_token ? h('p', {}, 'It carries this fleet\'s CA fingerprint: the agent needs no ca_fingerprint line.') : null,
        h('div', { class: 'secret' }, secret,
          h('button', { type: 'button', class: 'secondary', onclick: async () => {
            try { await navigator.clipboard.writeText(paste); announce('Copied'); } catch { announce('Copy failed; select the text instead'); }
          } }, 'Copy'))));
      form.reset();
      announce(`Created token ${result.token.name}`);
      await refresh();
    } catch (e) {
      showProblem(form, e);
    }
  });
  await ctx.poll(refresh, 5000);
}
