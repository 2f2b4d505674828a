// The only way the UI talks to the control plane: the documented REST API under /api/v1,
// with the signed-in token as a bearer token. Errors arrive as RFC 7807 problem JSON and are
// thrown as ApiProblem so forms can put `invalid_params` next to the fields they name.

const TOKEN_KEY = 'kvfleet.token';
const BASE = '/api/v1';

export class ApiProblem extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title || '';
    this.type = problem.type || '';
    this.invalidParams = Array.isArray(problem.invalid_params) ? problem.invalid_params : [];
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

// Called when the server says the token is no longer valid (401), e.g. revoked.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export async function api(method, path, body, { token = session.token, quiet401 = false } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch (e) {
    throw new ApiProblem(0, { title: 'Network error', detail: `cannot reach the control plane (${e.message})` });
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    const problem = new ApiProblem(response.status, data || { detail: text || response.statusText });
    if (response.status === 401 && !quiet401) onUnauthorized(problem);
    throw problem;
  }
  return data;
}

export const get = (path, opts) => api('GET', path, undefined, opts);
export const post = (path, body, opts) => api('POST', path, body, opts);
export const patch = (path, body, opts) => api('PATCH', path, body, opts);
export const del = (path, opts) => api('DELETE', path, undefined, opts);

// Every item of a list, following next_cursor (bounded so a huge fleet cannot hang the page).
export async function all(path, { maxPages = 20 } = {}) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < maxPages; i++) {
    const sep = path.includes('?') ? '&' : '?';
    const page = await get(`${path}${sep}limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
    items.push(...page.items);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return items;
}

// A metrics series for the last `minutes`, bucketed so a chart has about 60 points.
export function metrics(kind, id, minutes = 15) {
  const until = new Date();
  const since = new Date(until.getTime() - minutes * 60_000);
  const step = Math.max(1, Math.round((minutes * 60) / 60));
  const q = `since=${encodeURIComponent(since.toISOString())}&until=${encodeURIComponent(until.toISOString())}&step_s=${step}`;
  return get(`/metrics/${kind}/${encodeURIComponent(id)}?${q}`);
}
