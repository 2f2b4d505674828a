// The SLA planner in the UI: its decisions as a timeline (reason, inputs, outcome, and the
// arithmetic behind a disclosure), a deployment's observed TTFT/ITL against its targets and its
// workers per role against the planner's targets, and the fleet's GPU budget.

import { get, patch as apiPatch } from '/ui/js/api.js';
import { h, patch, badge, field, formError, showProblem, clearErrors, announce } from '/ui/js/dom.js';
import { lineChart } from '/ui/js/chart.js';
import { ms, num, time } from '/ui/js/format.js';

const ACTION_TONE = { scale_up: 'warn', scale_down: 'info', rebalance: 'info', hold: 'muted' };

export function counts(c) {
  const parts = [];
  if (c.aggregated) parts.push(`${c.aggregated} aggregated`);
  if (c.prefill) parts.push(`${c.prefill} prefill`);
  if (c.decode) parts.push(`${c.decode} decode`);
  return parts.join(' + ') || '0';
}

// One decision's inputs in a line: what the planner saw.
function inputsText(detail) {
  const i = detail?.inputs || {};
  const p = detail?.prediction || {};
  const pctl = detail?.sla?.percentile ? `p${detail.sla.percentile}` : 'p90';
  const parts = [`observed ${num(i.rate, 2)} req/s`];
  if (i.ttft_ms !== null && i.ttft_ms !== undefined) parts.push(`TTFT ${pctl} ${ms(i.ttft_ms)}`);
  if (i.itl_ms !== null && i.itl_ms !== undefined) parts.push(`ITL ${pctl} ${ms(i.itl_ms)}`);
  if (p.rate !== undefined) parts.push(`predicted ${num(p.rate, 2)} req/s (${p.predictor})`);
  return parts.join(' · ');
}

export function plannerTimeline(items, { withDeployment = true } = {}) {
  if (!items.length) return h('p', { class: 'empty' }, 'No planner decisions yet (planner off, or no round has run).');
  return h('ol', { class: 'timeline planner-timeline', 'aria-label': 'Planner decisions, newest first' }, items.map((d) => h('li', { 'data-action': d.action, 'data-decision': String(d.id) },
    h('div', {},
      h('time', { class: 'when', datetime: d.at }, time(d.at)),
      badge(d.mode, d.mode === 'auto' ? 'ok' : 'muted'), ' ',
      badge(d.action.replace('_', ' '), ACTION_TONE[d.action] || 'muted'), ' ',
      withDeployment ? [h('a', { href: `/ui/deployments/${d.deployment_id}`, 'data-link': true }, d.deployment), ' · '] : null,
      h('span', { class: 'outcome' }, `${counts(d.current)} → ${counts(d.targets)}`),
      ' · ', h('span', { class: 'muted' }, d.applied ? 'applied' : (d.mode === 'advise' ? 'advised only' : 'no change'))),
    h('div', { class: 'reason' }, d.reason),
    h('div', { class: 'inputs muted' }, inputsText(d.detail)),
    h('details', {}, h('summary', {}, 'Arithmetic'),
      h('ul', { class: 'arithmetic mono' }, (d.detail?.arithmetic || []).map((line) => h('li', {}, line)))))));
}

// Observed TTFT/ITL against the targets, workers per role against the planner's targets.
export function plannerCharts(points) {
  const t = (p) => new Date(p.at).getTime();
  const series = (key, scale = 1) => points.map((p) => ({ t: t(p), v: p[key] === null || p[key] === undefined ? null : p[key] * scale }));
  const pctl = points.at(-1)?.percentile ?? 90;
  const roles = ['aggregated', 'prefill', 'decode'].filter((r) => points.some((p) => p.workers[r] || p.targets?.[r]));
  const workerSeries = roles.flatMap((r) => [
    { name: `${r} serving`, points: points.map((p) => ({ t: t(p), v: p.workers[r] })) },
    { name: `${r} target`, points: points.map((p) => ({ t: t(p), v: p.targets ? p.targets[r] : null })) },
  ]);
  return h('div', { class: 'grid planner-charts' },
    lineChart(`TTFT p${pctl} vs target`, [{ name: 'observed', points: series('ttft_ms') }, { name: 'target', points: series('ttft_target_ms') }], { yFormat: ms }),
    lineChart(`ITL p${pctl} vs target`, [{ name: 'observed', points: series('itl_ms') }, { name: 'target', points: series('itl_target_ms') }], { yFormat: ms }),
    lineChart('Workers per role', workerSeries.length ? workerSeries : [{ name: 'workers', points: [] }], { yFormat: (v) => num(v, 0) }),
    lineChart('Load', [{ name: 'requests/s', points: series('rate') }, { name: 'predicted', points: series('predicted_rate') }], { yFormat: (v) => num(v, 1) }));
}

// The fleet's GPU budget; operators can change it.
export function budgetPanel(ctx, settings, onSaved) {
  const info = h('p', {}, `GPU budget: ${settings.gpu_budget ?? 'none'} (deployments' minimums: ${settings.minimums}; a round every ${settings.interval_s} s; last ${settings.last_round_at ? time(settings.last_round_at) : 'never'})`);
  if (!ctx.can('operate')) return h('div', { class: 'panel planner-budget' }, info);
  const form = h('form', { class: 'inline', novalidate: true, 'aria-label': 'GPU budget' },
    field({ label: 'GPU budget', name: 'gpu_budget', type: 'number', value: settings.gpu_budget === null ? '' : String(settings.gpu_budget), min: 0, hint: 'empty: no fleet-wide limit' }),
    formError(),
    h('button', { type: 'submit', class: 'secondary' }, 'Set budget'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors(form);
    const v = form.elements.gpu_budget.value.trim();
    try {
      await apiPatch('/planner', { gpu_budget: v === '' ? null : Number(v) });
      announce('GPU budget saved');
      await onSaved();
    } catch (e) {
      showProblem(form, e);
    }
  });
  return h('div', { class: 'panel planner-budget' }, info, form);
}

export async function loadDecisions(deployment, limit = 30, changesOnly = false) {
  const q = `limit=${limit}${deployment ? `&deployment=${encodeURIComponent(deployment)}` : ''}${changesOnly ? '&changes_only=true' : ''}`;
  return (await get(`/planner/decisions?${q}`)).items;
}

export async function loadSeries(id, minutes = 60) {
  const until = new Date();
  const since = new Date(until.getTime() - minutes * 60_000);
  return get(`/deployments/${encodeURIComponent(id)}/planner?since=${encodeURIComponent(since.toISOString())}&until=${encodeURIComponent(until.toISOString())}`);
}

