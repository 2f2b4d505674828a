// Models: what can be deployed (name, format, where the weights are on every node), with
// create and delete for operators.

import { post, del, all } from '/ui/js/api.js';
import { h, patch, table, field, formError, showProblem, clearErrors, announce } from '/ui/js/dom.js';
import { bytes, ago } from '/ui/js/format.js';

export const title = 'Models';

export async function mount(ctx) {
  const list = h('div', {});
  const listError = h('p', { class: 'form-error', role: 'alert', hidden: true });
  ctx.root.append(h('h1', {}, 'Models'));
  let models = [];
  let deployments = [];
  const refresh = async () => {
    [models, deployments] = await Promise.all([all('/models'), all('/deployments')]);
    const cols = [
      { label: 'Name', key: 'name', value: (m) => m.name },
      { label: 'Format', key: 'format', value: (m) => m.format },
      { label: 'Path', key: 'path', value: (m) => h('span', { class: 'mono' }, m.path) },
      { label: 'Block size', num: true, value: (m) => String(m.block_size) },
      { label: 'Context', num: true, value: (m) => (m.context_length ? String(m.context_length) : '—') },
      { label: 'Memory per worker', num: true, value: (m) => (m.memory_bytes ? bytes(m.memory_bytes) : 'any GPU') },
      { label: 'Deployments', value: (m) => deployments.filter((d) => d.model_id === m.id).map((d) => d.name).join(', ') || '—' },
      { label: 'Added', value: (m) => ago(m.created_at) },
    ];
    if (ctx.can('operate')) {
      cols.push({ label: 'Actions', value: (m) => h('button', { type: 'button', class: 'danger', 'aria-label': `Delete model ${m.name}`, onclick: async () => {
        // eslint-disable-next-line no-alert
        if (!window.confirm(`Delete model ${m.name}?`)) return;
        listError.hidden = true;
        try { await del(`/models/${m.id}`); announce(`Deleted ${m.name}`); await refresh(); } catch (e) { listError.textContent = e.message; listError.hidden = false; }
      } }, 'Delete') });
    }
    patch(list, table(cols, models, { caption: 'Models', empty: 'No models yet.', rowAttrs: (m) => ({ 'data-model': m.name }) }));
  };

  if (ctx.can('operate')) {
    const form = h('form', { class: 'card', novalidate: true, 'aria-labelledby': 'h-new-model' },
      h('h2', { id: 'h-new-model' }, 'Add a model'),
      h('div', { class: 'fields' },
        field({ label: 'Name', name: 'name', hint: 'e.g. smollm2-135m' }),
        field({ label: 'Format', name: 'format', value: 'gguf', options: ['gguf', 'safetensors', 'mock'] }),
        field({ label: 'Path on every node', name: 'path', hint: 'weights file or directory' }),
        field({ label: 'Block size', name: 'block_size', type: 'number', value: '16', hint: 'tokens per KV block' }),
        field({ label: 'Context length', name: 'context_length', type: 'number', hint: 'empty: the model\u2019s own' }),
        field({ label: 'Memory per worker (GiB)', name: 'memory_bytes', type: 'number', step: 'any', hint: 'empty: fits any GPU' })),
      formError(),
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Add model')));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      clearErrors(form);
      const el = form.elements;
      const num = (name, scale = 1) => {
        const v = el[name].value.trim();
        return v === '' ? undefined : Math.round(Number(v) * scale);
      };
      const body = {
        name: el.namedItem('name').value.trim(),
        format: el.format.value,
        path: el.path.value.trim(),
        block_size: num('block_size'),
        context_length: num('context_length'),
        memory_bytes: num('memory_bytes', 1024 ** 3),
      };
      try {
        await post('/models', body);
        announce(`Added ${body.name}`);
        form.reset();
        await refresh();
      } catch (e) {
        showProblem(form, e);
      }
    });
    ctx.root.append(form);
  }
  ctx.root.append(h('section', { 'aria-labelledby': 'h-models' }, h('h2', { id: 'h-models' }, 'All models'), listError, list));
  await ctx.poll(refresh, 5000);
}
