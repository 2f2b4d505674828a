// The shell of the single-page app: sign-in, navigation by role, routing on the History API
// (the control plane answers every /ui/<page> with index.html), and polling for live updates.
//
// Each page module exports `mount(ctx)`; `ctx.poll(fn, ms)` runs fn now and then every ms
// while the page is shown and the tab is visible, so nothing has to be reloaded by hand.

import { get, session, setUnauthorizedHandler, ApiProblem } from '/ui/js/api.js';
import { h, field, formError, showProblem, clearErrors, announce } from '/ui/js/dom.js';
import * as overview from '/ui/js/pages/overview.js';
import * as node from '/ui/js/pages/node.js';
import * as deployments from '/ui/js/pages/deployments.js';
import * as models from '/ui/js/pages/models.js';
import * as kv from '/ui/js/pages/kv.js';
import * as decisions from '/ui/js/pages/decisions.js';
import * as audit from '/ui/js/pages/audit.js';
import * as tokens from '/ui/js/pages/tokens.js';

// [pattern, module, permission needed, nav label (null: not in the nav)]
const ROUTES = [
  [/^$/, overview, 'read', 'Overview'],
  [/^nodes\/([^/]+)$/, node, 'read', null],
  [/^deployments$/, deployments, 'read', 'Deployments'],
  [/^deployments\/([^/]+)$/, { mount: deployments.mountDetail, title: 'Deployment' }, 'read', null],
  [/^models$/, models, 'read', 'Models'],
  [/^kv$/, kv, 'read', 'KV cache'],
  [/^decisions$/, decisions, 'read', 'Decisions'],
  [/^audit$/, audit, 'admin', 'Audit log'],
  [/^tokens$/, tokens, 'admin', 'Tokens'],
];
const NAV_PATHS = { Overview: '', Deployments: 'deployments', Models: 'models', 'KV cache': 'kv', Decisions: 'decisions', 'Audit log': 'audit', Tokens: 'tokens' };
const POLL_MS = Number(new URLSearchParams(location.search).get('poll_ms')) || 2000;

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const banner = document.getElementById('banner');

let me = null;           // the /whoami answer
let disposers = [];      // what the current page must stop on leaving

const can = (permission) => Boolean(me?.permissions?.includes(permission));

function pagePath() {
  return decodeURI(location.pathname.replace(/^\/ui\/?/, '')).replace(/\/$/, '');
}

export function navigate(path, { replace = false } = {}) {
  const url = `/ui/${path}`;
  if (replace) history.replaceState(null, '', url); else history.pushState(null, '', url);
  render();
}

function leave() {
  for (const dispose of disposers) { try { dispose(); } catch { /* page already gone */ } }
  disposers = [];
}

function showBanner(text) {
  banner.textContent = text;
  banner.hidden = !text;
}

function renderNav(current) {
  nav.replaceChildren(...ROUTES.filter(([, , perm, label]) => label && can(perm)).map(([, , , label]) => {
    const path = NAV_PATHS[label];
    const active = current === path || (path && current.startsWith(`${path}/`)) || (label === 'Overview' && current.startsWith('nodes/'));
    return h('a', { href: `/ui/${path}`, 'data-link': true, 'aria-current': active ? 'page' : null }, label);
  }));
  nav.hidden = false;
  who.replaceChildren(
    h('span', {}, h('span', { class: 'visually-hidden' }, 'Signed in as '), me.actor, ' · ', h('strong', { 'data-role': me.role }, me.role)),
    h('button', { type: 'button', onclick: signOut }, 'Sign out'));
  who.hidden = false;
}

function signOut() {
  session.token = null;
  me = null;
  navigate('', { replace: true });
}

setUnauthorizedHandler(() => {
  // The token was revoked or expired while the page was open.
  session.token = null;
  me = null;
  render('Your session ended (the token is no longer valid). Sign in again.');
});

function renderSignIn(message) {
  leave();
  nav.hidden = true;
  who.hidden = true;
  document.title = 'Sign in · kvfleet';
  const form = h('form', { class: 'card signin', 'aria-labelledby': 'signin-title', novalidate: true },
    h('h1', { id: 'signin-title' }, 'Sign in to kvfleet'),
    h('p', { class: 'muted' }, 'Paste an API token (admin, operator or viewer). It is kept in this tab only (sessionStorage).'),
    field({ label: 'API token', name: 'token', type: 'password', placeholder: 'kvf_…' }),
    formError(),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Sign in')));
  if (message) {
    const general = form.querySelector('.form-error');
    general.textContent = message;
    general.hidden = false;
  }
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors(form);
    const token = form.elements.token.value.trim();
    if (!token) {
      showProblem(form, { message: '', invalidParams: [{ name: 'token', reason: 'enter a token' }] });
      return;
    }
    try {
      me = await get('/whoami', { token, quiet401: true });
      session.token = token;
      announce(`Signed in as ${me.role}`);
      render();
    } catch (e) {
      const reason = e.status === 401 ? 'this token is not valid (unknown, expired or revoked)'
        : e.status === 403 ? 'this token cannot sign in here (agent and join tokens are for nodes)'
          : e.message;
      showProblem(form, { message: '', invalidParams: [{ name: 'token', reason }] });
    }
  });
  main.replaceChildren(form);
  form.elements.token.focus();
}

async function render(message) {
  leave();
  showBanner('');
  if (!session.token) { renderSignIn(message); return; }
  if (!me) {
    try {
      me = await get('/whoami', { quiet401: true });
    } catch (e) {
      session.token = null;
      renderSignIn(e instanceof ApiProblem && e.status === 401 ? 'Your session ended. Sign in again.' : e.message);
      return;
    }
  }
  const path = pagePath();
  renderNav(path);
  const match = ROUTES.map(([re, mod, perm]) => [re.exec(path), mod, perm]).find(([m]) => m);
  const container = h('div', {});
  main.replaceChildren(container);
  if (!match) {
    container.append(h('h1', {}, 'Not found'), h('p', {}, 'No page here. ', h('a', { href: '/ui/', 'data-link': true }, 'Back to the overview')));
    return;
  }
  const [m, mod, perm] = match;
  if (!can(perm)) {
    document.title = 'Not allowed · kvfleet';
    container.append(h('h1', {}, 'Not allowed'), h('p', {}, `Your role (${me.role}) cannot see this page.`));
    return;
  }
  let alive = true;
  disposers.push(() => { alive = false; });
  const ctx = {
    root: container,
    params: m.slice(1),
    me,
    can,
    navigate,
    setTitle: (t) => { document.title = `${t} · kvfleet`; },
    // Runs fn now and every `ms` while this page is shown; errors go to the banner and clear
    // when a later run succeeds.
    poll(fn, ms = POLL_MS) {
      let timer = null;
      let running = false;
      const tick = async () => {
        if (!alive || running) return;
        if (document.hidden) { timer = setTimeout(tick, ms); return; }
        running = true;
        try { await fn(); showBanner(''); } catch (e) {
          if (e instanceof ApiProblem && e.status === 401) return;
          showBanner(`Live update failed: ${e.message}`);
        } finally { running = false; }
        if (alive) timer = setTimeout(tick, ms);
      };
      disposers.push(() => clearTimeout(timer));
      return tick();
    },
  };
  ctx.setTitle(mod.title || 'kvfleet');
  try {
    await mod.mount(ctx);
  } catch (e) {
    if (!(e instanceof ApiProblem && e.status === 401)) showBanner(e.message);
  }
}

// Same-origin links marked data-link navigate without reloading.
document.addEventListener('click', (event) => {
  const a = event.target.closest('a[data-link]');
  if (!a || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  event.preventDefault();
  navigate(a.getAttribute('href').replace(/^\/ui\/?/, ''));
  main.focus({ preventScroll: true });
});
window.addEventListener('popstate', () => render());

render();
