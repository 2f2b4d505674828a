// Deployments: the list with live worker counts, create / edit / delete (operators), and a
// detail page with workers, metrics charts and the decisions about the deployment. Validation
// errors from the API (problem JSON `invalid_params`) appear at the field they name.

import { get, post, patch as apiPatch, del, all, metrics } from '/ui/js/api.js';
import { h, patch, table, badge, field, formError, showProblem, clearErrors, announce } from '/ui/js/dom.js';
import { lineChart, pointsOf } from '/ui/js/chart.js';
import { workersTable } from '/ui/js/pages/overview.js';
import { timeline } from '/ui/js/pages/decisions.js';
import { ms, num, pct, ago, time } from '/ui/js/format.js';
import { plannerTimeline, plannerCharts, loadDecisions, loadSeries, counts } from '/ui/js/pages/planner.js';

export const title = 'Deployments';

function slaText(d) {
  const parts = [];
  if (d.sla.ttft_ms) parts.push(`TTFT ≤ ${d.sla.ttft_ms} ms`);
  if (d.sla.itl_ms) parts.push(`ITL ≤ ${d.sla.itl_ms} ms`);
  if (!parts.length) return '—';
  return `${parts.join(', ')} at p${d.sla.percentile ?? 90}`;
}

function rolesText(d) {
  const r = d.roles || {};
  const parts = ['prefill', 'decode'].filter((k) => r[k]).map((k) => `${k} ${r[k].min}–${r[k].max}`);
  return parts.join(', ') || '—';
}

function readyText(d, workers) {
  const mine = workers.filter((w) => w.deployment_id === d.id && w.desired_state !== 'stopped');
  return `${mine.filter((w) => w.observed_state === 'ready').length}/${mine.length} ready`;
}

export async function mount(ctx) {
  const list = h('div', {});
  const formSlot = h('div', {});
  ctx.root.append(h('h1', {}, 'Deployments'), formSlot, h('section', { 'aria-labelledby': 'h-list' }, h('h2', { id: 'h-list' }, 'All deployments'), list));

  let state = { deployments: [], workers: [], models: [] };
  let rates = {};
  let form = null;

  const openForm = (deployment) => {
    form = deploymentForm(ctx, state.models, deployment, async () => {
      openForm(null);
      await refresh();
    });
    formSlot.replaceChildren(form);
    if (deployment) form.querySelector('input:not([disabled]), select:not([disabled])')?.focus();
  };

  const draw = () => {
    const canOperate = ctx.can('operate');
    const cols = [
      { label: 'Name', key: 'name', value: (d) => h('a', { href: `/ui/deployments/${d.id}`, 'data-link': true }, d.name) },
      { label: 'Model', key: 'model', value: (d) => d.model },
      { label: 'Mode', key: 'mode', value: (d) => d.mode },
      { label: 'Workers', key: 'workers', value: (d) => readyText(d, state.workers) },
      { label: 'Min–max', key: 'range', value: (d) => `${d.min_workers}–${d.max_workers}` },
      { label: 'SLA', key: 'sla', value: slaText },
      { label: 'Planner', key: 'planner', value: (d) => d.planner || 'off' },
      { label: 'Migrations', key: 'migration', num: true, value: (d) => String(d.migration_limit ?? 3) },
      { label: 'Requests/s', key: 'rps', num: true, value: (d) => num(rates[d.id], 2) },
      { label: 'Updated', key: 'updated', value: (d) => ago(d.updated_at) },
    ];
    if (canOperate) {
      cols.push({ label: 'Actions', key: 'actions', value: (d) => h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'secondary', 'aria-label': `Edit ${d.name}`, onclick: () => openForm(d) }, 'Edit'),
        h('button', { type: 'button', class: 'danger', 'aria-label': `Delete ${d.name}`, onclick: async () => {
          // eslint-disable-next-line no-alert
          if (!window.confirm(`Delete deployment ${d.name}? Its workers stop.`)) return;
          try { await del(`/deployments/${d.id}`); announce(`Deleted ${d.name}`); await refresh(); } catch (e) { ctx.root.querySelector('.list-error').textContent = e.message; }
        } }, 'Delete')) });
    }
    // Rows with buttons are rebuilt only when their text changes (patch compares markup).
    patch(list, h('div', {}, h('p', { class: 'form-error list-error', role: 'alert' }),
      table(cols, state.deployments, { caption: 'Deployments', empty: 'No deployments yet.', rowAttrs: (d) => ({ 'data-deployment': d.name }) })));
  };

  const refresh = async () => {
    const [deployments, workers, models] = await Promise.all([all('/deployments'), all('/workers'), all('/models')]);
    const modelsChanged = JSON.stringify(models.map((m) => m.name)) !== JSON.stringify(state.models.map((m) => m.name));
    state = { deployments, workers, models };
    if (ctx.can('operate') && (!form || (modelsChanged && !form.dataset.editing))) openForm(null);
    draw();
  };
  await ctx.poll(refresh);
  ctx.poll(async () => {
    const series = await Promise.all(state.deployments.map((d) => metrics('deployments', d.id, 5)));
    rates = Object.fromEntries(state.deployments.map((d, i) => [d.id, series[i].points.at(-1)?.request_rate ?? null]));
    draw();
  }, 5000);
}

function disaggregationText(d) {
  const p = d.disaggregation;
  if (!p) return '—';
  const text = `remote prefill from ${p.min_remote_prefill_tokens} uncached tokens, prefill queue ≤ ${p.max_prefill_queue_tokens} tokens, timeout ${p.prefill_timeout_ms} ms`;
  return d.mode === 'disaggregated' ? text : `${text} (unused while aggregated)`;
}

// Older control planes send no `migration_limit`: shown as the server default then.
function migrationText(d) {
  const limit = d.migration_limit ?? 3;
  if (limit === 0) return '0 (a request whose worker fails mid-stream ends with an error)';
  return `${limit} (a request whose worker fails mid-stream moves to another worker at most ${limit === 1 ? 'once' : `${limit} times`})`;
}

// The output parsers a deployment may name (kvfleet_proto::api::ToolParser, ReasoningParser).
const TOOL_PARSERS = [
  ['auto', 'auto: the node\'s setting, else the chat template\'s'],
  ['hermes', 'hermes: <tool_call>{…}</tool_call>'],
  ['llama3_json', 'llama3_json: Llama 3 JSON'],
  ['mistral', 'mistral: [TOOL_CALLS]'],
  ['pythonic', 'pythonic: [f(a=1)]'],
];
const REASONING_PARSERS = [
  ['auto', 'auto: the node\'s setting, else the chat template\'s'],
  ['none', 'none: <think> stays in the content'],
  ['think', 'think: a leading <think>…</think>'],
  ['deepseek_r1', 'deepseek_r1: the output starts in the reasoning'],
];

function deploymentForm(ctx, models, existing, done) {
  const editing = Boolean(existing);
  const d = existing || { name: '', model: models[0]?.name || '', mode: 'aggregated', min_workers: 1, max_workers: 1, sla: {}, placement: {}, planner: 'off', roles: {} };
  const roles = d.roles || {};
  const roleValue = (role, key) => (roles[role] ? String(roles[role][key]) : '');
  const labels = Object.entries(d.placement.node_labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
  // Older control planes send no policy: the fields start empty (the server's defaults).
  const policy = d.disaggregation || {};
  const policyValue = (key) => (policy[key] === undefined ? '' : String(policy[key]));
  const form = h('form', { class: 'card', novalidate: true, 'aria-labelledby': 'h-form', dataset: editing ? { editing: d.id } : {} },
    h('h2', { id: 'h-form' }, editing ? `Edit deployment ${d.name}` : 'Create a deployment'),
    h('div', { class: 'fields' },
      field({ label: 'Name', name: 'name', value: d.name, hint: 'lowercase letters, digits, dashes', disabled: editing }),
      field({ label: 'Model', name: 'model', value: d.model, options: models.length ? models.map((m) => m.name) : [['', 'no models yet']], disabled: editing }),
      field({ label: 'Mode', name: 'mode', value: d.mode, options: ['aggregated', 'disaggregated'] }),
      field({ label: 'Min workers', name: 'min_workers', type: 'number', value: String(d.min_workers), min: 0 }),
      field({ label: 'Max workers', name: 'max_workers', type: 'number', value: String(d.max_workers), min: 1 }),
      field({ label: 'SLA planner', name: 'planner', value: d.planner || 'off', options: [['off', 'off: run min workers'], ['advise', 'advise: record decisions'], ['auto', 'auto: scale to the SLA']] }),
      field({ label: 'Migration limit', name: 'migration_limit', type: 'number', value: d.migration_limit === undefined ? '' : String(d.migration_limit), min: 0, hint: 'moves of a request whose worker fails mid-stream; 0: none; empty: 3' }),
      field({ label: 'Tool-call parser', name: 'tool_parser', value: d.tool_parser || 'auto', options: TOOL_PARSERS }),
      field({ label: 'Reasoning parser', name: 'reasoning_parser', value: d.reasoning_parser || 'auto', options: REASONING_PARSERS })),
    h('fieldset', {}, h('legend', {}, 'SLA targets'), h('div', { class: 'fields' },
      field({ label: 'TTFT target (ms)', name: 'sla.ttft_ms', type: 'number', value: d.sla.ttft_ms ? String(d.sla.ttft_ms) : '', hint: 'time to first token; empty: none' }),
      field({ label: 'ITL target (ms)', name: 'sla.itl_ms', type: 'number', value: d.sla.itl_ms ? String(d.sla.itl_ms) : '', hint: 'inter-token latency; empty: none' }),
      field({ label: 'Percentile', name: 'sla.percentile', type: 'number', value: d.sla.percentile ? String(d.sla.percentile) : '', step: 'any', hint: 'the targets hold at; empty: 90' }))),
    h('fieldset', {}, h('legend', {}, 'Workers per role (disaggregated mode)'), h('div', { class: 'fields' },
      field({ label: 'Prefill min', name: 'roles.prefill.min', type: 'number', value: roleValue('prefill', 'min'), min: 0, hint: 'empty: no role bound' }),
      field({ label: 'Prefill max', name: 'roles.prefill.max', type: 'number', value: roleValue('prefill', 'max'), min: 0 }),
      field({ label: 'Decode min', name: 'roles.decode.min', type: 'number', value: roleValue('decode', 'min'), min: 0 }),
      field({ label: 'Decode max', name: 'roles.decode.max', type: 'number', value: roleValue('decode', 'max'), min: 0 }))),
    h('fieldset', {}, h('legend', {}, 'Placement'), h('div', { class: 'fields' },
      field({ label: 'GPU name contains', name: 'placement.gpu_name', value: d.placement.gpu_name || '', hint: 'e.g. H100; empty: any' }),
      field({ label: 'Node labels', name: 'placement.node_labels', value: labels, hint: 'key=value, comma separated' }),
      field({ label: 'May run on CPU slots', name: 'placement.allow_cpu', type: 'checkbox', value: Boolean(d.placement.allow_cpu) }))),
    h('fieldset', {}, h('legend', {}, 'Disaggregation (disaggregated mode)'), h('div', { class: 'fields' },
      field({ label: 'Remote prefill from (tokens)', name: 'disaggregation.min_remote_prefill_tokens', type: 'number', value: policyValue('min_remote_prefill_tokens'), min: 0, hint: 'uncached prompt tokens; 0: always; empty: 256' }),
      field({ label: 'Prefill queue limit (tokens)', name: 'disaggregation.max_prefill_queue_tokens', type: 'number', value: policyValue('max_prefill_queue_tokens'), min: 1, hint: 'empty: 16384' }),
      field({ label: 'Prefill timeout (ms)', name: 'disaggregation.prefill_timeout_ms', type: 'number', value: policyValue('prefill_timeout_ms'), min: 100, hint: '100 to 600000; empty: 30000' }))),
    formError(),
    h('div', { class: 'actions' },
      h('button', { type: 'submit' }, editing ? 'Save changes' : 'Create deployment'),
      editing ? h('button', { type: 'button', class: 'secondary', onclick: () => done(false) }, 'Cancel') : null));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearErrors(form);
    const el = form.elements;
    const int = (name) => {
      const v = el[name].value.trim();
      return v === '' ? null : Number(v);
    };
    const nodeLabels = {};
    const labelErrors = [];
    for (const part of el['placement.node_labels'].value.split(',').map((x) => x.trim()).filter(Boolean)) {
      const i = part.indexOf('=');
      if (i < 0) labelErrors.push(part); else nodeLabels[part.slice(0, i).trim()] = part.slice(i + 1).trim();
    }
    if (labelErrors.length) {
      showProblem(form, { message: '', invalidParams: [{ name: 'placement.node_labels', reason: `write key=value (not ${JSON.stringify(labelErrors[0])})` }] });
      return;
    }
    const roleBounds = {};
    for (const role of ['prefill', 'decode']) {
      const min = int(`roles.${role}.min`);
      const max = int(`roles.${role}.max`);
      if (min !== null || max !== null) roleBounds[role] = { min: min ?? 0, max: max ?? int('max_workers') ?? 1 };
    }
    const body = {
      mode: el.mode.value,
      planner: el.planner.value,
      min_workers: int('min_workers'),
      max_workers: int('max_workers'),
      migration_limit: int('migration_limit'),
      tool_parser: el.tool_parser.value,
      reasoning_parser: el.reasoning_parser.value,
      roles: roleBounds,
      sla: { ttft_ms: int('sla.ttft_ms'), itl_ms: int('sla.itl_ms'), percentile: int('sla.percentile') },
      placement: {
        node_labels: nodeLabels,
        nodes: d.placement.nodes || [],
        gpu_name: el['placement.gpu_name'].value.trim() || null,
        allow_cpu: el['placement.allow_cpu'].checked,
      },
      disaggregation: {
        min_remote_prefill_tokens: int('disaggregation.min_remote_prefill_tokens'),
        max_prefill_queue_tokens: int('disaggregation.max_prefill_queue_tokens'),
        prefill_timeout_ms: int('disaggregation.prefill_timeout_ms'),
      },
    };
    // Absent means "the default" for create; the server says which values it cannot take.
    for (const k of ['min_workers', 'max_workers', 'migration_limit']) if (body[k] === null) delete body[k];
    if (body.sla.percentile === null) delete body.sla.percentile;
    if (body.placement.gpu_name === null) delete body.placement.gpu_name;
    for (const k of Object.keys(body.disaggregation)) if (body.disaggregation[k] === null) delete body.disaggregation[k];
    try {
      if (editing) {
        await apiPatch(`/deployments/${d.id}`, body);
        announce(`Saved ${d.name}`);
      } else {
        body.name = el.namedItem('name').value.trim();
        body.model = el.model.value;
        await post('/deployments', body);
        announce(`Created ${body.name}`);
      }
      await done(true);
    } catch (e) {
      showProblem(form, e);
    }
  });
  return form;
}

export async function mountDetail(ctx) {
  const [id] = ctx.params;
  const slots = { head: h('div', {}), info: h('div', {}), charts: h('div', {}), workers: h('div', {}), decisions: h('div', {}), planner: h('div', {}), plannerCharts: h('div', {}) };
  ctx.root.append(h('p', {}, h('a', { href: '/ui/deployments', 'data-link': true }, '← Deployments')),
    slots.head, slots.info,
    h('section', { 'aria-labelledby': 'h-planner' }, h('h2', { id: 'h-planner' }, 'SLA planner'), slots.plannerCharts, slots.planner),
    slots.charts,
    h('section', { 'aria-labelledby': 'h-workers' }, h('h2', { id: 'h-workers' }, 'Workers'), slots.workers),
    h('section', { 'aria-labelledby': 'h-dec' }, h('h2', { id: 'h-dec' }, 'Placement decisions'), slots.decisions));
  await ctx.poll(async () => {
    const [d, workers, nodes, gpus, decisions] = await Promise.all([
      get(`/deployments/${encodeURIComponent(id)}`), all(`/workers?deployment_id=${encodeURIComponent(id)}`),
      all('/nodes'), all('/gpus'), get(`/decisions?deployment_id=${encodeURIComponent(id)}&limit=30`)]);
    ctx.setTitle(d.name);
    patch(slots.head, h('h1', {}, `Deployment ${d.name}`));
    patch(slots.info, h('dl', { class: 'kv panel' },
      h('dt', {}, 'Model'), h('dd', {}, d.model),
      h('dt', {}, 'Mode'), h('dd', {}, d.mode),
      h('dt', {}, 'Workers'), h('dd', {}, `${readyText(d, workers)} (min ${d.min_workers}, max ${d.max_workers})`),
      h('dt', {}, 'SLA'), h('dd', {}, slaText(d)),
      h('dt', {}, 'Planner'), h('dd', { 'data-planner': d.planner || 'off' }, d.planner || 'off'),
      h('dt', {}, 'Role bounds'), h('dd', {}, rolesText(d)),
      h('dt', {}, 'Placement'), h('dd', { class: 'mono' }, JSON.stringify(d.placement)),
      h('dt', {}, 'Disaggregation'), h('dd', {}, disaggregationText(d)),
      h('dt', {}, 'Migration limit'), h('dd', { 'data-migration-limit': String(d.migration_limit ?? 3) }, migrationText(d)),
      h('dt', {}, 'Output parsers'), h('dd', { 'data-output-parsers': '1' }, `tool calls: ${d.tool_parser || 'auto'}, reasoning: ${d.reasoning_parser || 'auto'}`),
      h('dt', {}, 'Generation'), h('dd', {}, String(d.generation)),
      h('dt', {}, 'Created'), h('dd', {}, time(d.created_at))));
    patch(slots.workers, workersTable(workers, { nodes, gpus, deployments: [d] }));
    patch(slots.decisions, timeline(decisions.items, { deployments: [d], nodes }));
  });
  ctx.poll(async () => {
    const [decisions, points] = await Promise.all([loadDecisions(id, 20), loadSeries(id, 60)]);
    const last = decisions[0];
    patch(slots.planner, h('div', {},
      last ? h('p', { class: 'planner-now' }, `Now: ${counts(last.targets)} (${last.mode}) — ${last.reason}`) : null,
      h('h3', {}, 'Planner decisions'), plannerTimeline(decisions, { withDeployment: false })));
    patch(slots.plannerCharts, plannerCharts(points));
  }, 3000);
  ctx.poll(async () => {
    const m = await metrics('deployments', id, 15);
    patch(slots.charts, h('div', { class: 'grid' },
      lineChart('Throughput', [{ name: 'requests/s', points: pointsOf(m, 'request_rate') }, { name: 'tokens/s ÷ 10', points: pointsOf(m, 'tokens_per_s', 0.1) }], { yFormat: (v) => num(v, 1) }),
      lineChart('Latency', [
        { name: 'TTFT p50', points: pointsOf(m, 'ttft_p50_ms') }, { name: 'TTFT p99', points: pointsOf(m, 'ttft_p99_ms') },
        { name: 'ITL p50', points: pointsOf(m, 'itl_p50_ms') }, { name: 'ITL p99', points: pointsOf(m, 'itl_p99_ms') }], { yFormat: ms }),
      lineChart('KV cache', [
        { name: 'blocks used', points: (m.points || []).map((p) => ({ t: new Date(p.at).getTime(), v: p.kv_blocks_total ? p.kv_blocks_used / p.kv_blocks_total : null })) },
        { name: 'prefix hit rate', points: pointsOf(m, 'prefix_hit_rate') }], { yFormat: pct, yMax: 1 })));
  }, 5000);
}
